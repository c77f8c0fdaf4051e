"""StoryService: turns a story request into a stored story, whatever the upstreams do.

The degradation ladder lives here: each configured provider is tried in order
(OpenAI, then the Replicate text model), then a cached story for the same
request, then the offline storyteller. The story records which rung served it
(`provider`) and whether that was a fallback (`degraded`). An illustration that
fails is dropped; it never costs the child the story.

Idempotency: a request carrying an `Idempotency-Key` first claims the key in the
database (atomic across workers and replicas). The story is stored and the key
marked done in one transaction, so a repeat gets the first story and no
upstream is called twice. A repeat that arrives while the first request still
runs waits for it (up to `IDEMPOTENCY_WAIT_SECONDS`, within its own deadline),
then gets 409 with `Retry-After`. The same key with another body is a 422.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from app.core.resilience import ResilienceError, deadline_scope, graceful_degradation
from app.db.repository import ClaimLostError, StoryRepository
from app.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from app.models import PageCursor, StoryPage, StoryRecord
from app.providers.base import (
    GeneratedStory,
    IllustrationProvider,
    ProviderError,
    StoryProvider,
    StoryRequest,
)
from app.providers.offline import OfflineStoryProvider
from app.services.cache import StoryCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IdempotencyPolicy:
    # A pending claim older than this is taken to belong to a dead worker.
    lock_seconds: float = 60.0
    # Keys are remembered at least this long.
    ttl_seconds: float = 24 * 3600.0
    # How long a repeat waits for the first request before 409.
    wait_seconds: float = 10.0
    poll_seconds: float = 0.05


@dataclass(frozen=True, slots=True)
class CreatedStory:
    story: StoryRecord
    replayed: bool  # True when an earlier request with the same key made it


def request_fingerprint(request: StoryRequest, illustrate: bool) -> str:
    body = {
        "prompt": request.prompt,
        "age": request.age,
        "length": request.length,
        "language": request.language,
        "illustrate": illustrate,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _no_stories() -> list[StoryRecord]:
    return []


def _retry_after(failures: Sequence[Exception]) -> float:
    """When to come back: the soonest time an upstream said it may serve again."""
    waits = [
        float(wait)
        for error in failures
        if isinstance(wait := getattr(error, "retry_after", None), int | float) and wait > 0
    ]
    return min(waits) if waits else 5.0


class StoryService:
    def __init__(
        self,
        repository: StoryRepository,
        providers: Sequence[StoryProvider],
        *,
        offline: OfflineStoryProvider | None,
        illustrator: IllustrationProvider | None = None,
        cache: StoryCache | None = None,
        idempotency: IdempotencyPolicy | None = None,
        deadline_seconds: float = 30.0,
    ) -> None:
        self._deadline_seconds = deadline_seconds
        self._repository = repository
        self._providers = tuple(providers)
        self._offline = offline
        self._illustrator = illustrator
        self._cache = cache
        self._idempotency = idempotency or IdempotencyPolicy()

    @property
    def provider_names(self) -> list[str]:
        names = [p.name for p in self._providers]
        return [*names, "offline"] if self._offline else names

    async def create(
        self,
        owner: str,
        request: StoryRequest,
        *,
        illustrate: bool,
        idempotency_key: str | None = None,
    ) -> CreatedStory:
        # One deadline for the whole request (the wait for a duplicate, upstream
        # calls, the database); every layer below respects it.
        with deadline_scope(self._deadline_seconds) as deadline:
            if idempotency_key is None:
                story = await self._create_new(owner, request, illustrate, None, None)
                return CreatedStory(story, False)
            return await self._create_once(
                owner, request, illustrate, idempotency_key, deadline.remaining()
            )

    async def _create_once(
        self,
        owner: str,
        request: StoryRequest,
        illustrate: bool,
        idempotency_key: str,
        time_left: float,
    ) -> CreatedStory:
        policy = self._idempotency
        fingerprint = request_fingerprint(request, illustrate)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + min(policy.wait_seconds, time_left)
        while True:
            now = datetime.now(UTC)
            locked_until = now + timedelta(seconds=policy.lock_seconds)
            entry = await self._repository.claim_key(
                owner,
                idempotency_key,
                fingerprint,
                now=now,
                locked_until=locked_until,
                expires_at=now + timedelta(seconds=policy.ttl_seconds),
            )
            if entry is None:
                story = await self._create_claimed(
                    owner, request, illustrate, idempotency_key, locked_until
                )
                return CreatedStory(story, False)
            if entry.fingerprint != fingerprint:
                raise InvalidRequestError(
                    "This Idempotency-Key was used with a different request body.",
                    errors=[
                        {
                            "field": "Idempotency-Key",
                            "reason": "already used with a different request body",
                        }
                    ],
                )
            if entry.state == "done" and entry.story_id is not None:
                first = await self._repository.get(entry.story_id, owner)
                if first is not None:
                    return CreatedStory(first, True)
            if loop.time() >= give_up_at:
                raise ConflictError(
                    "A request with this Idempotency-Key is still being processed; "
                    "repeat it shortly to get its result.",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(policy.poll_seconds)

    async def _create_claimed(
        self,
        owner: str,
        request: StoryRequest,
        illustrate: bool,
        key: str,
        claimed_until: datetime,
    ) -> StoryRecord:
        try:
            return await self._create_new(owner, request, illustrate, key, claimed_until)
        except ClaimLostError:
            # This request outlived its claim and another took the key over: that
            # one's story is the answer; the repeat will get it.
            raise ConflictError(
                "A newer request with this Idempotency-Key took over; repeat to get its result.",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            # Free the key so the phone's retry can run; shielded, because a
            # cancelled request must still release what it holds.
            await asyncio.shield(self._release_quietly(owner, key))
            raise

    async def _release_quietly(self, owner: str, key: str) -> None:
        try:
            await self._repository.release_key(owner, key)
        except Exception:
            logger.warning("could not release idempotency key; it expires", exc_info=True)

    async def _create_new(
        self,
        owner: str,
        request: StoryRequest,
        illustrate: bool,
        idempotency_key: str | None,
        claimed_until: datetime | None,
    ) -> StoryRecord:
        started = time.perf_counter()
        story, degraded = await self._write(request)
        illustration_url = None
        if illustrate and self._illustrator is not None:
            illustration_url = await self._illustrate(request, story)
        record = StoryRecord(
            id=uuid.uuid4(),
            owner=owner,
            title=story.title,
            paragraphs=story.paragraphs,
            prompt=request.prompt,
            age=request.age,
            length=request.length,
            language=request.language,
            provider=story.provider,
            model=story.model,
            degraded=degraded,
            illustration_url=illustration_url,
            illustrate=illustrate,
            prompt_tokens=story.usage.prompt_tokens,
            completion_tokens=story.usage.completion_tokens,
            generation_ms=round((time.perf_counter() - started) * 1000),
            created_at=datetime.now(UTC),
        )
        await self._repository.add(
            record, idempotency_key=idempotency_key, claimed_until=claimed_until
        )
        logger.info(
            "story created",
            extra={"story_id": str(record.id), "provider": record.provider, "degraded": degraded},
        )
        return record

    async def _write(self, request: StoryRequest) -> tuple[GeneratedStory, bool]:
        failures: list[Exception] = []
        for rung, provider in enumerate(self._providers):
            try:
                story = await provider.generate(request)
            except (ProviderError, ResilienceError) as error:
                failures.append(error)
                logger.warning(
                    "story provider failed; trying the next rung",
                    extra={
                        "provider": provider.name,
                        "error": str(error) or type(error).__name__,
                    },
                )
                continue
            if self._cache is not None:
                await self._cache.put(request, story)
            return story, rung > 0
        if self._cache is not None:
            cached = await self._cache.get(request)
            if cached is not None:
                return cached, True
        if self._offline is not None:
            return self._offline.compose(request), True
        raise ServiceUnavailableError(
            "No story provider can serve right now.", retry_after=_retry_after(failures)
        )

    async def _illustrate(self, request: StoryRequest, story: GeneratedStory) -> str | None:
        assert self._illustrator is not None
        try:
            illustration = await self._illustrator.illustrate(request, story)
        except (ProviderError, ResilienceError) as error:
            logger.warning("illustration dropped", extra={"error": str(error)})
            return None
        return illustration.url

    async def get(self, owner: str, story_id: UUID) -> StoryRecord:
        story = await self._repository.get(story_id, owner)
        if story is None:
            raise NotFoundError(f"No story with id {story_id}.")
        return story

    async def list_page(self, owner: str, limit: int, cursor: str | None) -> StoryPage:
        after = None
        if cursor:
            try:
                after = PageCursor.decode(cursor)
            except ValueError:
                raise InvalidRequestError(
                    "The cursor is not one this service handed out.",
                    errors=[{"field": "cursor", "reason": "not a valid cursor"}],
                ) from None
        return await self._repository.list_page(owner, limit, after)

    @graceful_degradation(fallback_value=_no_stories, name="recommendations")
    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        """Recommendations are a nicety: an empty list beats an error screen."""
        return await self._repository.recommend(owner, age, limit)
