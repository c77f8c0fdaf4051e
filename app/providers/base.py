"""What a story provider is, and the one error tree every upstream failure maps to.

Adapters (`openai.py`, `replicate.py`) translate their SDK's exceptions into
`ProviderError` subclasses here, so the resilience layer decides on retries and
breaker counts from three attributes alone, whatever the upstream:

- `retryable`: the same request may succeed if sent again (connect errors, 408,
  429, 5xx, timeouts of calls that are safe to repeat);
- `counts_as_failure`: the upstream is unhealthy (trips the circuit breaker);
  a 4xx caused by our request does not count;
- `retry_after`: seconds the upstream asked us to wait (from `Retry-After` or
  `retry-after-ms`), or None.

    ProviderError
     +-- ProviderUnavailableError      connect error, reset, 5xx        retryable, counts
     |    +-- ProviderTimeoutError      no answer within the timeout     retryable*, counts
     +-- ProviderRateLimitedError       429                              retryable, counts
     +-- ProviderRejectedError          other 4xx (our request is bad)   permanent, no count
     |    +-- ProviderAuthError         401/403 (key wrong or missing)   permanent, counts
     +-- ProviderResponseError          reply did not parse / validate   retryable, counts

(*) a timeout is retryable only when the call was safe to repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ProviderError(Exception):
    """Root of every upstream failure. Never raised directly."""

    retryable: bool = False
    counts_as_failure: bool = True

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after


class ProviderUnavailableError(ProviderError):
    retryable = True


class ProviderTimeoutError(ProviderUnavailableError):
    def __init__(self, provider: str, message: str, *, safe_to_repeat: bool = True) -> None:
        super().__init__(provider, message)
        self.retryable = safe_to_repeat


class ProviderRateLimitedError(ProviderError):
    retryable = True


class ProviderRejectedError(ProviderError):
    retryable = False
    counts_as_failure = False


class ProviderAuthError(ProviderRejectedError):
    # A wrong key fails every call the same way: let the breaker stop the calls.
    counts_as_failure = True


class ProviderResponseError(ProviderError):
    retryable = True


@dataclass(frozen=True, slots=True)
class StoryRequest:
    """A validated request for a story, as the providers see it."""

    prompt: str
    age: int
    length: str
    language: str

    @property
    def paragraph_count(self) -> int:
        return {"short": 3, "medium": 5, "long": 8}[self.length]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GeneratedStory:
    """A story as a provider wrote it, before it is stored."""

    title: str
    paragraphs: tuple[str, ...]
    provider: str
    model: str
    usage: Usage = field(default_factory=Usage)
    # How the content was checked (set by the story service, `app.services.moderation`):
    # the prompt by "openai" or "local"; the text by "openai", "local", "cache" (checked
    # when first written) or "templates" (the offline storyteller's fixed text).
    prompt_checked_by: str = ""
    text_checked_by: str = ""

    @property
    def checked_locally(self) -> bool:
        """The local word list, not OpenAI's moderation, passed the prompt or the text."""
        return "local" in (self.prompt_checked_by, self.text_checked_by)


@dataclass(frozen=True, slots=True)
class Illustration:
    url: str
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class ModerationVerdict:
    """What a content check said about one text."""

    flagged: bool
    checker: str  # "openai" or "local"
    categories: tuple[str, ...] = ()


class ContentModerator(Protocol):
    """Checks a text for content unfit for children. Raises ProviderError when it cannot."""

    name: str

    async def moderate(self, text: str) -> ModerationVerdict: ...


class StoryProvider(Protocol):
    """Writes a story. Raises ProviderError (and only that) when it cannot."""

    name: str

    async def generate(self, request: StoryRequest) -> GeneratedStory: ...


class IllustrationProvider(Protocol):
    name: str

    async def illustrate(self, request: StoryRequest, story: GeneratedStory) -> Illustration: ...
