"""IllustrationService: a story's picture, drawn in the background and kept in our own store.

The story never waits for its picture. `StoryService` stores the story with its
picture `pending` and returns it; then `schedule` draws it in a task of this
process: the image model (through its guard), the output file fetched at once
and checked (`app.providers.pictures`), the picture moderated by OpenAI, then
stored in the object store (`app.platform.objects`) under a key of our own,
`illustrations/<story id>/<sha256>.<ext>`, and the story marked `ready` (or
`failed`, with the reason). The upstream's URL is never stored or shown.

Surviving a worker's death: a worker holds a pending picture on a lease
(`ILLUSTRATION_LEASE_SECONDS`, renewed every third of it by a heartbeat, under
a random token: the same style as Idempotency-Keys). Every worker sweeps, at
start and every `ILLUSTRATION_SWEEP_SECONDS`, for pending pictures nobody holds
(never claimed, their lease lapsed, or due for a retry) and draws them; a
picture tried `ILLUSTRATION_MAX_ATTEMPTS` times is marked failed. So a picture
is never pending forever: it is drawn by another worker, or given up on. A
worker that stops (shutdown, a deploy) hands its pictures back at once instead.

What a failure does: a picture that is not one (wrong type, too large,
unreadable) or that the moderation flagged is failed at once (it is never
stored); anything else (upstream down, breaker open, no time left, the store
or the moderation unavailable) hands the picture back for a later attempt.
A picture the moderation could not check is never stored nor served.

How the app learns it is ready: `illustration.status` in the story (poll
`GET /v1/stories/{id}`), or `GET /v1/stories/{id}/illustration`, which answers
`202` with `Retry-After` while pending, the picture once ready, `404` once
failed (README, "Illustrations").
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from app.core.resilience import CircuitBreaker, ResilienceError, deadline_scope
from app.db.repository import StorageUnavailableError, StoryRepository
from app.errors import NotFoundError, ServiceUnavailableError
from app.models import StoredIllustration, StoryRecord
from app.platform.background import stop_task
from app.platform.config import IllustrationSettings, ObjectStoreSettings
from app.platform.objects import ObjectStore, ObjectStoreUnavailableError
from app.providers.base import (
    GeneratedStory,
    IllustrationProvider,
    ProviderError,
    StoryRequest,
    Usage,
)
from app.providers.pictures import ImageModerator, Picture, PictureRefusedError, PictureSource

logger = logging.getLogger(__name__)

PENDING, READY, FAILED = "pending", "ready", "failed"
# Errors that leave the picture pending, for a later attempt.
_TRANSIENT = (
    ProviderError,
    ResilienceError,
    ObjectStoreUnavailableError,
    StorageUnavailableError,
    TimeoutError,
)


class _Final(Exception):
    """This picture will not be drawn: failed now, with this reason."""


@dataclass(frozen=True, slots=True)
class PictureReply:
    """What `GET /v1/stories/{id}/illustration` answers."""

    status: str  # pending | ready | not_modified
    media_type: str | None = None
    data: bytes | None = None
    etag: str | None = None
    redirect_url: str | None = None
    retry_after: int = 5


def etag_matches(if_none_match: str | None, etag: str | None) -> bool:
    """RFC 9110 weak comparison of `If-None-Match` against the picture's ETag."""
    if not if_none_match or etag is None:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or etag in {tag.removeprefix("W/") for tag in tags}


def picture_key(story_id: UUID, picture: Picture) -> str:
    return f"illustrations/{story_id}/{picture.sha256}.{picture.extension}"


class IllustrationService:
    def __init__(
        self,
        repository: StoryRepository,
        store: ObjectStore,
        *,
        illustrator: IllustrationProvider | None,
        fetcher: PictureSource | None,
        moderator: ImageModerator | None,
        settings: IllustrationSettings | None = None,
        objects: ObjectStoreSettings | None = None,
        breakers: dict[str, CircuitBreaker] | None = None,
    ) -> None:
        self._repository = repository
        self.store = store
        self._illustrator = illustrator
        self._fetcher = fetcher
        self._moderator = moderator
        self.settings = settings or IllustrationSettings(_env_file=None)
        self._objects = objects or ObjectStoreSettings(_env_file=None)
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._running: dict[UUID, asyncio.Task[None]] = {}
        # Breakers of its own (`replicate:files`), for health and metrics.
        self.breakers = dict(breakers or {})

    @property
    def unavailable_reason(self) -> str | None:
        """Why no picture can be drawn here (None: pictures can be drawn)."""
        if self._illustrator is None or self._fetcher is None:
            return "no image model configured"
        if self._moderator is None and self.settings.moderation == "required":
            return "no picture check available (OpenAI moderation)"
        return None

    def initial(self) -> StoredIllustration:
        """The picture of a story just written that asked for one."""
        reason = self.unavailable_reason
        if reason is not None:
            return StoredIllustration(status=FAILED, error=reason)
        return StoredIllustration(status=PENDING)

    # --- drawing --------------------------------------------------------------------

    def schedule(self, story_id: UUID) -> None:
        """Draws the story's pending picture in a task of this process (unless one is)."""
        if self.unavailable_reason is not None or story_id in self._running:
            return
        # A context of its own: not the request's deadline, which ends with the request.
        task = asyncio.create_task(
            self._draw_when_free(story_id),
            name=f"illustration:{story_id}",
            context=contextvars.Context(),
        )
        self._running[story_id] = task
        task.add_done_callback(lambda _: self._running.pop(story_id, None))

    async def sweep(self) -> None:
        """Gives up on pictures tried too often; schedules those nobody holds."""
        now = datetime.now(UTC)
        given_up = await self._repository.give_up_illustrations(now, self.settings.max_attempts)
        if given_up:
            logger.warning("illustrations given up", extra={"count": given_up})
        if self.unavailable_reason is not None:
            return
        room = max(0, 2 * self.settings.concurrency - len(self._running))
        for story_id in await self._repository.pending_illustrations(now, room):
            self.schedule(story_id)

    async def drain(self) -> None:
        """Stops every drawing of this process (at shutdown): their leases lapse and
        another worker, or this one's next start, takes them up."""
        await asyncio.gather(*(stop_task(task) for task in list(self._running.values())))

    async def _draw_when_free(self, story_id: UUID) -> None:
        try:
            async with self._slots:
                await self._claim_and_draw(story_id)
        except Exception as error:  # the sweep tries again; never an unhandled task error
            logger.warning(
                "illustration attempt failed",
                extra={"story_id": str(story_id), "error": repr(error)},
            )

    async def _claim_and_draw(self, story_id: UUID) -> None:
        cfg = self.settings
        token = secrets.token_hex(16)
        now = datetime.now(UTC)
        story = await self._repository.claim_illustration(
            story_id,
            token=token,
            now=now,
            locked_until=now + timedelta(seconds=cfg.lease_seconds),
            max_attempts=cfg.max_attempts,
        )
        if story is None or story.illustration is None:
            return  # held by another worker, done, or deleted
        attempts = story.illustration.attempts
        heartbeat = asyncio.create_task(self._keep_lease(story_id, token))
        retry_at: datetime | None = None
        try:
            outcome = await self._draw(story)
        except asyncio.CancelledError:
            # This worker is stopping: hand the picture back now, not after the lease.
            stopped = StoredIllustration(status=PENDING, attempts=attempts, error="worker stopped")
            await self._shielded(
                self._repository.settle_illustration(
                    story_id, token, stopped, retry_at=datetime.now(UTC)
                )
            )
            raise
        except _Final as final:
            outcome = StoredIllustration(status=FAILED, attempts=attempts, error=str(final))
        except _TRANSIENT as error:
            reason = str(error) or type(error).__name__
            if attempts >= cfg.max_attempts:
                outcome = StoredIllustration(status=FAILED, attempts=attempts, error=reason)
            else:
                outcome = StoredIllustration(status=PENDING, attempts=attempts, error=reason)
                backoff = min(cfg.sweep_seconds * 2 ** (attempts - 1), 3600.0)
                retry_at = datetime.now(UTC) + timedelta(seconds=backoff)
        finally:
            await stop_task(heartbeat)
        held = await self._shielded(
            self._repository.settle_illustration(story_id, token, outcome, retry_at=retry_at)
        )
        if not held and outcome.key is not None:
            # Deleted, or taken over meanwhile: the copy we stored belongs to nobody.
            await self._shielded(self.store.delete(outcome.key))
        logger.log(
            logging.WARNING if outcome.status != READY else logging.INFO,
            "illustration %s",
            outcome.status if held else "abandoned",
            extra={"story_id": str(story_id), "attempt": attempts, "reason": outcome.error},
        )

    async def _draw(self, story: StoryRecord) -> StoredIllustration:
        assert self._illustrator is not None
        assert self._fetcher is not None
        request = StoryRequest(
            prompt=story.prompt, age=story.age, length=story.length, language=story.language
        )
        written = GeneratedStory(
            title=story.title,
            paragraphs=story.paragraphs,
            provider=story.provider,
            model=story.model,
            usage=Usage(),
        )
        with deadline_scope(self.settings.deadline_seconds):
            drawn = await self._illustrator.illustrate(request, written)
            try:
                picture = await self._fetcher.fetch(drawn.url)
            except PictureRefusedError as error:
                raise _Final(f"refused: {error.message}") from error
            if self._moderator is not None:
                verdict = await self._moderator.moderate_image(picture)
                if verdict.flagged:
                    logger.warning(
                        "illustration flagged by the content check; dropped",
                        extra={"story_id": str(story.id), "categories": list(verdict.categories)},
                    )
                    raise _Final("flagged by the content check")
            key = picture_key(story.id, picture)
            await self.store.put(key, picture.data)
        return StoredIllustration(
            status=READY,
            key=key,
            media_type=picture.media_type,
            size_bytes=len(picture.data),
            width=picture.width,
            height=picture.height,
            sha256=picture.sha256,
            attempts=story.illustration.attempts if story.illustration else 1,
        )

    async def _keep_lease(self, story_id: UUID, token: str) -> None:
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            until = datetime.now(UTC) + timedelta(seconds=lease)
            try:
                held = await self._repository.renew_illustration(story_id, token, until)
            except Exception as error:
                logger.warning(
                    "could not renew an illustration lease", extra={"error": repr(error)}
                )
                continue
            if not held:
                return

    @staticmethod
    async def _shielded(work: Coroutine[Any, Any, Any]) -> Any:
        """Awaits `work` to its end even when the drawing task is being cancelled."""
        try:
            return await asyncio.shield(asyncio.ensure_future(work))
        except (ObjectStoreUnavailableError, StorageUnavailableError) as error:
            logger.warning("could not record an illustration", extra={"error": repr(error)})
            return False

    # --- serving --------------------------------------------------------------------

    async def open(
        self, owner: str, story_id: UUID, if_none_match: str | None = None
    ) -> PictureReply:
        """The owner's picture; `NotFoundError` for another owner's, none, or a failed one.

        A matching `if_none_match` is answered from the row alone (`not_modified`):
        the store is not read."""
        story = await self._repository.get(story_id, owner)
        if story is None:
            raise NotFoundError(f"No story with id {story_id}.")
        picture = story.illustration
        if picture is None or picture.status == FAILED:
            raise NotFoundError(f"Story {story_id} has no picture.")
        if picture.status == PENDING or picture.key is None:
            return PictureReply(
                status=PENDING, retry_after=max(1, round(self.settings.lease_seconds / 6))
            )
        if etag_matches(if_none_match, picture.etag):
            return PictureReply(status="not_modified", etag=picture.etag)
        try:
            if self._objects.serve == "redirect":
                url = await self.store.signed_url(picture.key, self._objects.signed_url_seconds)
                if url is not None:
                    return PictureReply(
                        status=READY,
                        media_type=picture.media_type,
                        etag=picture.etag,
                        redirect_url=url,
                    )
            data = await self.store.get(picture.key)
        except ObjectStoreUnavailableError as error:
            logger.warning("object store unavailable", extra={"error": repr(error)})
            raise ServiceUnavailableError("Pictures cannot be read right now.") from error
        if data is None:
            logger.error(
                "stored picture missing", extra={"story_id": str(story_id), "key": picture.key}
            )
            raise NotFoundError(f"Story {story_id} has no picture.")
        return PictureReply(
            status=READY, media_type=picture.media_type, data=data, etag=picture.etag
        )

    async def delete_story(self, owner: str, story_id: UUID) -> None:
        """Deletes the owner's story and its stored picture (`NotFoundError`: no such story)."""
        deleted = await self._repository.delete(story_id, owner)
        if deleted is None:
            raise NotFoundError(f"No story with id {story_id}.")
        task = self._running.get(story_id)
        if task is not None:
            await stop_task(task)
        if deleted.illustration is not None and deleted.illustration.key is not None:
            try:
                await self.store.delete(deleted.illustration.key)
            except ObjectStoreUnavailableError as error:
                # The story is gone; its picture is unreachable (no row names it).
                logger.error(
                    "picture of a deleted story not deleted",
                    extra={"key": deleted.illustration.key, "error": repr(error)},
                )
