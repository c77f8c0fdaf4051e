"""Replicate-hosted models: a text model for stories, an image model for pictures.

Through the official SDK. Two things the SDK does on its own are undone here:

- Its `RetryTransport` retries GETs on 429/503/504 up to ten times; our requests
  bypass it (see `build_client`), because the resilience layer is the one retry layer.
- A prediction is billed when it is created. If the create request times out or
  the connection drops after it was sent, the prediction may exist: we look for
  it among the recent predictions (same model, same input, created since we
  sent) and poll it, instead of paying for a second one.

A prediction is polled until it succeeds, fails, or the caller's deadline cancels
the poll; on cancellation the prediction is cancelled upstream (best effort), so
an abandoned request stops costing money.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from replicate.client import Client
from replicate.exceptions import ReplicateError

from app.platform.config import ReplicateSettings
from app.providers.base import (
    GeneratedStory,
    Illustration,
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
from app.providers.prompting import parse_story, system_prompt, user_prompt

logger = logging.getLogger(__name__)

NAME = "replicate"
_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# Clock skew allowance when matching a prediction whose create reply we lost.
_LOST_CREATE_SKEW = timedelta(seconds=30)


def map_replicate_error(error: Exception) -> ProviderError:
    if isinstance(error, httpx.TimeoutException | TimeoutError):
        return ProviderTimeoutError(NAME, "no reply within the timeout")
    if isinstance(error, httpx.TransportError):
        return ProviderUnavailableError(NAME, f"connection failed: {error!r}")
    if isinstance(error, ReplicateError):
        status = error.status or 0
        message = f"HTTP {status}: {error.detail or error.title or 'error'}"
        if status == 429:
            return ProviderRateLimitedError(NAME, message, status_code=status)
        if status in (401, 403):
            return ProviderAuthError(NAME, message, status_code=status)
        if status == 408 or status >= 500 or status == 0:
            return ProviderUnavailableError(NAME, message, status_code=status)
        return ProviderRejectedError(NAME, message, status_code=status)
    return ProviderResponseError(NAME, f"unusable reply: {error!r}")


def build_client(settings: ReplicateSettings) -> tuple[Client, httpx.AsyncHTTPTransport]:
    """The SDK client, and the transport (our connection pool) the caller must close.

    The SDK (replicate 1.0.7, `_build_httpx_client`) always wraps the `transport`
    it is given in its retrying `RetryTransport`, and passes its other keyword
    arguments on to `httpx.AsyncClient`. So the transport also goes in as the
    `mounts` entry for every URL: httpx sends each request to a matching mount
    before its default transport, and the SDK's wrapper is never used. (Passing
    `transport` too only keeps the SDK from building a second, unused pool; as
    it does pass a transport, httpx mounts no proxies from the environment that
    could take precedence.)
    """
    assert settings.api_token is not None
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=settings.max_connections)
    )
    client = Client(
        api_token=settings.api_token.get_secret_value(),
        base_url=str(settings.base_url).rstrip("/"),
        timeout=httpx.Timeout(
            settings.read_timeout_seconds, connect=settings.connect_timeout_seconds
        ),
        transport=transport,
        mounts={"all://": transport},
    )
    return client, transport


class ReplicatePredictions:
    """Create-and-poll, with lost-create recovery and cancellation, for one model."""

    def __init__(
        self,
        client: Client,
        model: str,
        *,
        poll_interval: float,
        create_timeout: float,
        prediction_timeout: float,
    ) -> None:
        self._client = client
        self.model = model
        self._poll_interval = poll_interval
        self._create_timeout = create_timeout
        self._prediction_timeout = prediction_timeout

    async def run(self, model_input: dict[str, Any]) -> Any:
        """Returns the finished prediction; raises ProviderError otherwise."""
        sent_at = datetime.now(UTC)
        try:
            # The SDK sends creates with no timeout at all: bound it ourselves.
            async with asyncio.timeout(self._create_timeout):
                prediction = await self._client.predictions.async_create(
                    model=self.model, input=model_input
                )
        except (
            TimeoutError,
            httpx.TimeoutException,
            httpx.RemoteProtocolError,
            httpx.ReadError,
        ) as error:
            # The request went out; the prediction may exist and be billed.
            found = await self._find_lost(model_input, sent_at)
            if found is None:
                # Not found (or the list failed): it may still exist. Never
                # create a second one blindly; this rung gives up instead.
                raise ProviderTimeoutError(
                    NAME, f"create reply lost ({error!r}); not repeated", safe_to_repeat=False
                ) from error
            logger.warning(
                "replicate create reply lost; polling the prediction found upstream",
                extra={"prediction_id": found.id, "model": self.model},
            )
            prediction = found
        except (httpx.HTTPError, ReplicateError, ValueError) as error:
            # Refused before it was created (connect error, 4xx/5xx reply): safe to repeat.
            raise map_replicate_error(error) from error
        return await self._finish(prediction)

    async def _find_lost(self, model_input: dict[str, Any], sent_at: datetime) -> Any | None:
        try:
            page = await self._client.predictions.async_list()
        except (httpx.HTTPError, ReplicateError, ValueError):
            return None
        for candidate in page.results:
            created = _parse_time(getattr(candidate, "created_at", None))
            if (
                getattr(candidate, "model", None) == self.model
                and candidate.input == model_input
                and created is not None
                and created >= sent_at - _LOST_CREATE_SKEW
            ):
                return candidate
        return None

    async def _finish(self, prediction: Any) -> Any:
        """Polls a created prediction to its end, within the prediction timeout.

        Everything after the create is about one billed prediction: its errors are
        never retried by creating another. A prediction we stop waiting for (time
        out, cancelled by the caller's deadline, poll refused) is cancelled upstream.
        """
        prediction_id = prediction.id
        finished = prediction
        try:
            async with asyncio.timeout(self._prediction_timeout):
                finished = await self._poll(prediction)
        except TimeoutError as error:
            raise ProviderTimeoutError(
                NAME,
                f"prediction {prediction_id} unfinished after {self._prediction_timeout:g} s",
                safe_to_repeat=False,
            ) from error
        finally:
            if getattr(finished, "status", None) not in _TERMINAL:
                await self._cancel_quietly(prediction_id)
        if finished.status != "succeeded":
            failed = ProviderUnavailableError(
                NAME, f"prediction {prediction_id} {finished.status}: {finished.error}"
            )
            failed.retryable = False  # a new prediction would be billed again
            raise failed
        return finished

    async def _poll(self, prediction: Any) -> Any:
        while prediction.status not in _TERMINAL:
            await asyncio.sleep(self._poll_interval)
            try:
                prediction = await self._client.predictions.async_get(prediction.id)
            except (httpx.HTTPError, ReplicateError, ValueError) as error:
                mapped = map_replicate_error(error)
                if not mapped.retryable:
                    raise mapped from error
                # A GET is safe to repeat: keep polling the same prediction.
                logger.warning(
                    "replicate poll failed; polling again",
                    extra={"prediction_id": prediction.id, "error": str(mapped)},
                )
        return prediction

    async def _cancel_quietly(self, prediction_id: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(
                asyncio.wait_for(self._client.predictions.async_cancel(prediction_id), 2.0)
            )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class ReplicateStoryProvider:
    name = NAME

    def __init__(self, predictions: ReplicatePredictions) -> None:
        self._predictions = predictions
        self.model = predictions.model

    async def generate(self, request: StoryRequest) -> GeneratedStory:
        prediction = await self._predictions.run(
            {
                "prompt": user_prompt(request),
                "system_prompt": system_prompt(request),
                "max_new_tokens": 1500,
                "temperature": 0.8,
            }
        )
        try:
            output = prediction.output
            text = "".join(output) if isinstance(output, list) else str(output or "")
            draft = parse_story(NAME, text)
            metrics = prediction.metrics or {}
            usage = Usage(
                prompt_tokens=int(metrics.get("input_token_count", 0) or 0),
                completion_tokens=int(metrics.get("output_token_count", 0) or 0),
            )
        except (AttributeError, TypeError, KeyError, ValueError) as error:
            raise ProviderResponseError(NAME, f"unusable prediction output: {error!r}") from error
        return GeneratedStory(
            title=draft.title,
            paragraphs=tuple(draft.paragraphs),
            provider=NAME,
            model=self.model,
            usage=usage,
        )


class ReplicateIllustrator:
    name = NAME

    def __init__(self, predictions: ReplicatePredictions) -> None:
        self._predictions = predictions
        self.model = predictions.model

    async def illustrate(self, request: StoryRequest, story: GeneratedStory) -> Illustration:
        prediction = await self._predictions.run(
            {
                "prompt": (
                    f"A warm, friendly children's book illustration for the story "
                    f"'{story.title}': {request.prompt}"
                ),
                "num_outputs": 1,
                "aspect_ratio": "4:3",
                "output_format": "webp",
            }
        )
        output = prediction.output
        url = output[0] if isinstance(output, list) and output else output
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ProviderResponseError(NAME, "image model returned no URL")
        return Illustration(url=url, provider=NAME, model=self.model)
