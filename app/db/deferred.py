"""A story repository that the service can start without: it connects in the background.

`DeferredRepository` implements `StoryRepository` around a `connect` coroutine
(open the store, then apply its migrations). `start()` makes one attempt at
once, so a database that answers is connected and migrated before the first
request, as before. When it does not answer, the service starts anyway: every
call raises `StorageUnavailableError` (503 with Retry-After for the API; the
readiness check names `database`), and a background task tries again with
exponential backoff and full jitter (`RetryPolicy.backoff`, capped at
`max_delay` seconds), logging each failed attempt once with its reason (secrets
removed). Once an attempt succeeds the calls go to the real repository and the
instance becomes ready by itself. `close()` stops the task and closes the real
repository if there is one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from uuid import UUID

from app.core.resilience import RetryPolicy
from app.db.repository import StorageUnavailableError, StoryRepository
from app.models import IdempotencyEntry, PageCursor, StoredIllustration, StoryPage, StoryRecord
from app.platform.background import stop_task

logger = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[StoryRepository]]
Sleep = Callable[[float], Awaitable[None]]


class DeferredRepository:
    """`StoryRepository` that delegates to the real one once `connect` has succeeded."""

    def __init__(
        self,
        backend: str,
        connect: Connect,
        *,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        secrets: Iterable[str] = (),
        sleep: Sleep = asyncio.sleep,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.backend = backend
        self._connect = connect
        self._policy = policy or RetryPolicy(
            name="database-connect", base_delay=base_delay, max_delay=max_delay
        )
        self._secrets = tuple(s for s in secrets if s)
        self._sleep = sleep
        self._target: StoryRepository | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_error = "not connected yet"
        self.attempts = 0
        self.connected = asyncio.Event()

    # --- connecting -------------------------------------------------------------

    async def start(self) -> None:
        """One attempt now; when it fails, keep trying in a background task."""
        if await self._attempt():
            return
        self._task = asyncio.create_task(self._keep_trying(), name="database-connect")

    async def _keep_trying(self) -> None:
        retry = 0
        while not await self._attempt(wait=self._policy.backoff(retry)):
            retry += 1

    async def _attempt(self, *, wait: float | None = None) -> bool:
        """Sleeps `wait` (when given), then connects and migrates; True once connected."""
        if wait is not None:
            await self._sleep(wait)
        self.attempts += 1
        repository: StoryRepository | None = None
        try:
            repository = await self._connect()
            applied = await repository.migrate()
        except asyncio.CancelledError:
            if repository is not None:
                await _close_quietly(repository)
            raise
        except Exception as error:
            if repository is not None:
                await _close_quietly(repository)
            self._last_error = self._redact(f"{type(error).__name__}: {error}")
            logger.warning(
                "database not available; the service runs without it and keeps trying",
                extra={
                    "backend": self.backend,
                    "attempt": self.attempts,
                    "error": self._last_error,
                    "next_retry_ceiling_seconds": self._next_ceiling(),
                },
            )
            return False
        if applied:
            logger.info("migrations applied", extra={"versions": applied})
        self._target = repository
        self.connected.set()
        if self.attempts > 1:
            logger.warning(
                "database connected", extra={"backend": self.backend, "attempt": self.attempts}
            )
        return True

    def _next_ceiling(self) -> float:
        exponent = min(self.attempts - 1, 62)
        return min(self._policy.max_delay, self._policy.base_delay * 2.0**exponent)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _ready(self) -> StoryRepository:
        if self._target is None:
            raise StorageUnavailableError(f"{self.backend}: not connected ({self._last_error})")
        return self._target

    # --- StoryRepository ------------------------------------------------------

    async def migrate(self) -> list[str]:
        return await self._ready().migrate()

    async def applied_migrations(self) -> list[str]:
        return await self._ready().applied_migrations()

    async def add(
        self,
        story: StoryRecord,
        *,
        idempotency_key: str | None = None,
        claim_token: str | None = None,
    ) -> None:
        await self._ready().add(story, idempotency_key=idempotency_key, claim_token=claim_token)

    async def claim_key(
        self,
        owner: str,
        key: str,
        fingerprint: str,
        *,
        token: str,
        now: datetime,
        locked_until: datetime,
        expires_at: datetime,
    ) -> IdempotencyEntry | None:
        return await self._ready().claim_key(
            owner,
            key,
            fingerprint,
            token=token,
            now=now,
            locked_until=locked_until,
            expires_at=expires_at,
        )

    async def renew_key(self, owner: str, key: str, token: str, *, locked_until: datetime) -> bool:
        return await self._ready().renew_key(owner, key, token, locked_until=locked_until)

    async def read_key(self, owner: str, key: str) -> IdempotencyEntry | None:
        return await self._ready().read_key(owner, key)

    async def release_key(self, owner: str, key: str, token: str) -> None:
        await self._ready().release_key(owner, key, token)

    async def purge_expired_keys(self, now: datetime) -> int:
        return await self._ready().purge_expired_keys(now)

    async def claim_illustration(
        self,
        story_id: UUID,
        *,
        token: str,
        now: datetime,
        locked_until: datetime,
        max_attempts: int,
    ) -> StoryRecord | None:
        return await self._ready().claim_illustration(
            story_id, token=token, now=now, locked_until=locked_until, max_attempts=max_attempts
        )

    async def renew_illustration(self, story_id: UUID, token: str, locked_until: datetime) -> bool:
        return await self._ready().renew_illustration(story_id, token, locked_until)

    async def settle_illustration(
        self,
        story_id: UUID,
        token: str,
        illustration: StoredIllustration,
        *,
        retry_at: datetime | None = None,
    ) -> bool:
        return await self._ready().settle_illustration(
            story_id, token, illustration, retry_at=retry_at
        )

    async def pending_illustrations(self, now: datetime, limit: int) -> list[UUID]:
        return await self._ready().pending_illustrations(now, limit)

    async def give_up_illustrations(self, now: datetime, max_attempts: int) -> int:
        return await self._ready().give_up_illustrations(now, max_attempts)

    async def delete(self, story_id: UUID, owner: str) -> StoryRecord | None:
        return await self._ready().delete(story_id, owner)

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None:
        return await self._ready().get(story_id, owner)

    async def list_page(self, owner: str, limit: int, after: PageCursor | None = None) -> StoryPage:
        return await self._ready().list_page(owner, limit, after)

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        return await self._ready().recommend(owner, age, limit)

    async def count_created_since(self, owner: str, since: datetime) -> int:
        return await self._ready().count_created_since(owner, since)

    async def ping(self) -> float:
        return await self._ready().ping()

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        target, self._target = self._target, None
        if target is not None:
            await target.close()


async def _close_quietly(repository: StoryRepository) -> None:
    try:
        await repository.close()
    except Exception as error:
        logger.debug("closing a half-opened repository failed", extra={"error": repr(error)})
