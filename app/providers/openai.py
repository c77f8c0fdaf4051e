"""OpenAI chat completions as a story provider, through the official SDK.

The SDK's own retries are off (`max_retries=0`): the resilience layer is the one
retry layer, or attempts multiply. The client uses the SDK's aiohttp transport,
measured several times faster per request than its default httpx one
(docs/decisions.md), with at most `OPENAI_MAX_CONNECTIONS` connections. Every SDK
exception is mapped to the ProviderError tree.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI

from app.platform.config import OpenAISettings
from app.providers.base import (
    GeneratedStory,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    StoryRequest,
    Usage,
)
from app.providers.prompting import STORY_JSON_SCHEMA, parse_story, system_prompt, user_prompt

NAME = "openai"


def retry_after_seconds(headers: Any) -> float | None:
    """`retry-after-ms`, then `Retry-After` as seconds or an HTTP date; None if absent."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def map_openai_error(error: openai.OpenAIError) -> ProviderError:
    if isinstance(error, openai.APITimeoutError):
        return ProviderTimeoutError(NAME, "no reply within the timeout")
    if isinstance(error, openai.APIConnectionError):
        return ProviderUnavailableError(NAME, f"connection failed: {error}")
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        message = f"HTTP {status}: {error.message}"
        if status == 429:
            return ProviderRateLimitedError(
                NAME,
                message,
                status_code=status,
                retry_after=retry_after_seconds(error.response.headers),
            )
        if status in (401, 403):
            return ProviderAuthError(NAME, message, status_code=status)
        if status == 408 or status == 409 or status >= 500:
            return ProviderUnavailableError(
                NAME,
                message,
                status_code=status,
                retry_after=retry_after_seconds(error.response.headers),
            )
        return ProviderRejectedError(NAME, message, status_code=status)
    # APIResponseValidationError, JSON decode errors inside the SDK, and the like.
    return ProviderResponseError(NAME, f"unusable reply: {error}")


def openai_client(settings: OpenAISettings) -> AsyncOpenAI:
    """An SDK client of its own: its retries off (ours are the only ones), the
    configured timeouts, and a pool of `OPENAI_MAX_CONNECTIONS` connections."""
    assert settings.api_key is not None
    client = AsyncOpenAI(
        api_key=settings.api_key.get_secret_value(),
        base_url=str(settings.base_url),
        max_retries=0,
        timeout=openai.Timeout(
            settings.read_timeout_seconds, connect=settings.connect_timeout_seconds
        ),
        # DefaultAioHttpClient takes httpx2.AsyncClient's arguments (httpx2 is the
        # SDK's HTTP library, declared in pyproject.toml); the aiohttp transport
        # takes its connector's connection limit from `limits.max_connections`.
        http_client=openai.DefaultAioHttpClient(
            limits=httpx2.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
            )
        ),
    )
    return client


class OpenAIStoryProvider:
    name = NAME

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self._client = client
        self.model = model

    @classmethod
    def from_settings(cls, settings: OpenAISettings) -> OpenAIStoryProvider:
        return cls(openai_client(settings), settings.model)

    async def generate(self, request: StoryRequest) -> GeneratedStory:
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": system_prompt(request)},
                    {"role": "user", "content": user_prompt(request)},
                ],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "story", "schema": STORY_JSON_SCHEMA, "strict": True},
                },
                temperature=0.8,
            )
        except openai.OpenAIError as error:
            raise map_openai_error(error) from error
        except ValueError as error:  # a body that is not JSON at all
            raise ProviderResponseError(NAME, f"unusable reply: {error}") from error
        # The SDK does not validate the reply's shape: valid JSON of the wrong
        # shape surfaces here as attribute/type errors, an upstream error like any.
        try:
            if not completion.choices:
                raise ProviderResponseError(NAME, "reply has no choices")
            draft = parse_story(NAME, completion.choices[0].message.content)
            usage = completion.usage
            story = GeneratedStory(
                title=draft.title,
                paragraphs=tuple(draft.paragraphs),
                provider=NAME,
                model=str(completion.model or self.model),
                usage=Usage(
                    prompt_tokens=int(usage.prompt_tokens) if usage else 0,
                    completion_tokens=int(usage.completion_tokens) if usage else 0,
                ),
            )
        except (AttributeError, TypeError, IndexError, KeyError, ValueError) as error:
            raise ProviderResponseError(NAME, f"reply of an unexpected shape: {error!r}") from error
        return story

    async def close(self) -> None:
        await self._client.close()
