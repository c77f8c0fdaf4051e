"""StoryService: turns a story request into a stored story, whatever the upstreams do.

The degradation ladder lives here: each configured provider is tried in order
(OpenAI, then the Replicate text model), and the offline storyteller answers
when none can. The story records which rung served it (`provider`) and whether
that was a fallback (`degraded`). An illustration that fails is dropped; it
never costs the child the story.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from app.db.repository import StoryRepository
from app.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from app.models import PageCursor, StoryPage, StoryRecord
from app.providers.base import (
    GeneratedStory,
    IllustrationProvider,
    ProviderError,
    StoryProvider,
    StoryRequest,
)
from app.providers.offline import OfflineStoryProvider

logger = logging.getLogger(__name__)


class StoryService:
    def __init__(
        self,
        repository: StoryRepository,
        providers: Sequence[StoryProvider],
        *,
        offline: OfflineStoryProvider | None,
        illustrator: IllustrationProvider | None = None,
    ) -> None:
        self._repository = repository
        self._providers = tuple(providers)
        self._offline = offline
        self._illustrator = illustrator

    @property
    def provider_names(self) -> list[str]:
        names = [p.name for p in self._providers]
        return [*names, "offline"] if self._offline else names

    async def create(self, owner: str, request: StoryRequest, *, illustrate: bool) -> StoryRecord:
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
            prompt_tokens=story.usage.prompt_tokens,
            completion_tokens=story.usage.completion_tokens,
            generation_ms=round((time.perf_counter() - started) * 1000),
            created_at=datetime.now(UTC),
        )
        await self._repository.add(record)
        logger.info(
            "story created",
            extra={"story_id": str(record.id), "provider": record.provider, "degraded": degraded},
        )
        return record

    async def _write(self, request: StoryRequest) -> tuple[GeneratedStory, bool]:
        for rung, provider in enumerate(self._providers):
            try:
                return await provider.generate(request), rung > 0
            except ProviderError as error:
                logger.warning(
                    "story provider failed; trying the next rung",
                    extra={"provider": provider.name, "error": str(error)},
                )
        if self._offline is not None:
            return self._offline.compose(request), True
        raise ServiceUnavailableError("No story provider can serve right now.", retry_after=30)

    async def _illustrate(self, request: StoryRequest, story: GeneratedStory) -> str | None:
        assert self._illustrator is not None
        try:
            illustration = await self._illustrator.illustrate(request, story)
        except ProviderError as error:
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

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        try:
            return await self._repository.recommend(owner, age, limit)
        except Exception:
            # Recommendations are a nicety: an empty list beats an error screen.
            logger.warning("recommendations degraded to an empty list", exc_info=True)
            return []
