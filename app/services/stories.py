"""StoryService: turns a story request into a stored story, whatever the upstreams do.

The degradation ladder lives here: each configured provider is tried in order
(OpenAI, then the Replicate text model), then a cached story for the same
request, then the offline storyteller. The story records which rung served it
(`provider`) and whether that was a fallback (`degraded`). The story never waits
for its picture: it is stored and returned with the picture `pending`, which
`app.services.illustrations` draws, checks and stores in the background (a
picture that cannot be drawn never costs the child the story). A request with an
`Idempotency-Key` runs through `app.services.idempotency`, so a repeat never
writes (or pays for) a second story.

Child-safe content (`app.services.moderation`): the prompt is checked before
any rung runs (a flagged one is a 422 and no model sees it); each upstream
story is checked before it is cached, stored or returned (a flagged one is
dropped and the next rung serves). The cache holds only stories that passed;
the offline storyteller uses the caller's words only when the prompt passed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from uuid import UUID

from app.core.resilience import (
    DeadlineExceededError,
    ResilienceError,
    current_deadline,
    deadline_scope,
    graceful_degradation,
)
from app.db.repository import StoryRepository
from app.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from app.models import PageCursor, StoredIllustration, StoryPage, StoryRecord
from app.providers.base import (
    GeneratedStory,
    ProviderError,
    StoryProvider,
    StoryRequest,
)
from app.providers.offline import OfflineStoryProvider
from app.services.cache import StoryCache
from app.services.idempotency import (
    CreatedStory,
    IdempotencyKeys,
    IdempotencyPolicy,
    request_fingerprint,
)
from app.services.illustrations import IllustrationService, PictureReply
from app.services.ladder import LadderBudget
from app.services.moderation import ContentCheck, ModerationService
from app.services.quota import DailyQuota

logger = logging.getLogger(__name__)


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
        illustrations: IllustrationService | None = None,
        cache: StoryCache | None = None,
        idempotency: IdempotencyPolicy | None = None,
        deadline_seconds: float = 30.0,
        budget: LadderBudget | None = None,
        moderation: ModerationService | None = None,
        quota: DailyQuota | None = None,
    ) -> None:
        self._quota = quota
        self._deadline_seconds = deadline_seconds
        self._repository = repository
        self._providers = tuple(providers)
        self._offline = offline
        self._illustrations = illustrations
        self._cache = cache
        self._keys = IdempotencyKeys(repository, idempotency or IdempotencyPolicy())
        self._budget = budget or LadderBudget()
        # Without one given, the local word list checks (never no check at all).
        self._moderation = moderation or ModerationService(budget=self._budget)

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
            return await self._keys.create_once(
                owner,
                idempotency_key,
                request_fingerprint(request, illustrate),
                time_left=deadline.remaining(),
                create=lambda claim_token: self._create_new(
                    owner, request, illustrate, idempotency_key, claim_token
                ),
            )

    async def _create_new(
        self,
        owner: str,
        request: StoryRequest,
        illustrate: bool,
        idempotency_key: str | None,
        claim_token: str | None,
    ) -> StoryRecord:
        if self._quota is not None:  # before anything is paid for
            await self._quota.check(owner)
        started = time.perf_counter()
        story, degraded = await self._write(request)
        illustration = None
        if illustrate:
            illustration = (
                self._illustrations.initial()
                if self._illustrations is not None
                else StoredIllustration(status="failed", error="no image model configured")
            )
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
            illustration_url=None,
            illustration=illustration,
            illustrate=illustrate,
            moderated_locally=story.checked_locally,
            prompt_tokens=story.usage.prompt_tokens,
            completion_tokens=story.usage.completion_tokens,
            generation_ms=round((time.perf_counter() - started) * 1000),
            created_at=datetime.now(UTC),
        )
        await self._repository.add(record, idempotency_key=idempotency_key, claim_token=claim_token)
        if self._illustrations is not None and illustration is not None:
            self._illustrations.schedule(record.id)  # drawn after the story is returned
        logger.info(
            "story created",
            extra={
                "story_id": str(record.id),
                "provider": record.provider,
                "degraded": degraded,
                "prompt_checked_by": story.prompt_checked_by,
                "text_checked_by": story.text_checked_by,
                "checked_locally": story.checked_locally,
            },
        )
        return record

    async def _write(self, request: StoryRequest) -> tuple[GeneratedStory, bool]:
        prompt_check = await self._moderation.check_prompt(request)  # raises unless passed
        story, degraded = await self._ladder(request, prompt_check)
        return replace(story, prompt_checked_by=prompt_check.checker), degraded

    async def _ladder(
        self, request: StoryRequest, prompt_check: ContentCheck
    ) -> tuple[GeneratedStory, bool]:
        failures: list[Exception] = []
        unsuitable = 0  # upstream stories the content check dropped
        names = [provider.name for provider in self._providers]
        for rung, provider in enumerate(self._providers):
            try:
                story = await self._upstream_rung(names, rung, provider, request)
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
            check = await self._moderation.check_story(request, story)
            if not check.passed:
                logger.warning(
                    "story failed the content check; trying the next rung",
                    extra={
                        "provider": provider.name,
                        "verdict": check.verdict,
                        "checker": check.checker,
                        "categories": list(check.categories),
                    },
                )
                unsuitable += 1
                continue
            story = replace(story, text_checked_by=check.checker)
            if self._cache is not None:
                await self._cache.put(request, story)
            return story, rung > 0
        if self._cache is not None:
            cached = await self._cache.get(request)
            if cached is not None:
                # Only checked stories are cached: this one passed when first written.
                return replace(cached, text_checked_by="cache"), True
        if self._offline is not None:
            story = self._offline.compose(request, use_prompt=prompt_check.passed)
            return replace(story, text_checked_by="templates"), True
        if unsuitable:
            raise ServiceUnavailableError(
                "No story suitable for a child could be written for this idea right now. "
                "Please try again, or choose a different idea.",
                retry_after=_retry_after(failures),
            )
        raise ServiceUnavailableError(
            "No story provider can serve right now.", retry_after=_retry_after(failures)
        )

    async def _upstream_rung(
        self, names: list[str], rung: int, provider: StoryProvider, request: StoryRequest
    ) -> GeneratedStory:
        deadline = current_deadline()
        if deadline is None:
            return await provider.generate(request)
        # The time to check the story of this rung and of each later one comes off the
        # top: a check never eats into the next rung's time.
        checks = self._moderation.reserve_seconds * (len(names) - rung)
        seconds = self._budget.for_rung(names, rung, deadline.remaining() - checks)
        if seconds <= 0 or seconds < self._budget.floor(provider.name):
            raise DeadlineExceededError(f"{seconds:.2f} s left: too little for {provider.name}")
        return await self._budget.run(seconds, lambda: provider.generate(request))

    async def get(self, owner: str, story_id: UUID) -> StoryRecord:
        story = await self._repository.get(story_id, owner)
        if story is None:
            raise NotFoundError(f"No story with id {story_id}.")
        return story

    async def picture(
        self, owner: str, story_id: UUID, if_none_match: str | None = None
    ) -> PictureReply:
        if self._illustrations is None:
            raise NotFoundError(f"Story {story_id} has no picture.")
        return await self._illustrations.open(owner, story_id, if_none_match)

    async def delete(self, owner: str, story_id: UUID) -> None:
        """Deletes the owner's story and its stored picture."""
        if self._illustrations is not None:
            await self._illustrations.delete_story(owner, story_id)
        elif await self._repository.delete(story_id, owner) is None:
            raise NotFoundError(f"No story with id {story_id}.")

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
