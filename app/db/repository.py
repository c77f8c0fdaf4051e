"""Where stories are kept: every SQL statement of the service lives in app/db.

This module is the contract, `StoryRepository`, checked by one contract test
suite run against both stores, with its errors and what both stores share:
outage handling, the claim statement, the column lists, paging and the
migration files (`migrations/<backend>/NNNN_*.sql`, versioned and idempotent,
applied at start). Each store has its own module and imports this one, never
the reverse: `app.db.postgres` (an asyncpg pool, `DATABASE_URL`, the production
store) and `app.db.sqlite` (an embedded file, `DATABASE_SQLITE_PATH`, the
default when no database is configured, so the service runs out of the box).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, Protocol, TypeVar
from uuid import UUID

from app.models import IdempotencyEntry, PageCursor, StoredIllustration, StoryPage, StoryRecord


class StorageUnavailableError(Exception):
    """The store did not answer (down, unreachable, timed out): nothing was changed."""


class ClaimLostError(Exception):
    """The Idempotency-Key this request held was taken over; its story was not stored."""


class StoryRepository(Protocol):
    backend: str

    async def migrate(self) -> list[str]:
        """Apply pending migrations; returns the versions applied now."""

    async def applied_migrations(self) -> list[str]: ...

    async def add(
        self,
        story: StoryRecord,
        *,
        idempotency_key: str | None = None,
        claim_token: str | None = None,
    ) -> None:
        """Stores the story; with a key, marks that key done in the same transaction.

        `claim_token` is the token of this request's claim on the key: unless
        that claim is still pending (not taken over since, not released),
        nothing is stored (ClaimLostError).
        """

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
        """Claims an Idempotency-Key atomically across processes and replicas.

        Returns None when this caller now holds the key under `token`, with a
        lease until `locked_until` (the key was new, expired, or pending under a
        lease that lapsed before `now`, i.e. its holder died, for the same
        request); otherwise the entry an earlier request left.
        """

    async def renew_key(self, owner: str, key: str, token: str, *, locked_until: datetime) -> bool:
        """Extends the lease of the pending claim `token` to `locked_until`.

        False when `token` no longer holds a pending claim on the key (taken
        over, released, or done): nothing changed.
        """

    async def read_key(self, owner: str, key: str) -> IdempotencyEntry | None:
        """The entry of an Idempotency-Key, or None when nobody holds it."""

    async def release_key(self, owner: str, key: str, token: str) -> None:
        """Drops the pending claim `token` (its request failed), so a retry can run.

        A claim taken over by another request since is left alone.
        """

    async def purge_expired_keys(self, now: datetime) -> int: ...

    async def claim_illustration(
        self,
        story_id: UUID,
        *,
        token: str,
        now: datetime,
        locked_until: datetime,
        max_attempts: int,
    ) -> StoryRecord | None:
        """Takes the pending picture of a story on a lease, counting one more attempt.

        Only a picture that is pending, held by nobody (never claimed, or its
        lease lapsed before `now`: its worker died) and tried fewer than
        `max_attempts` times is taken. Returns the story (None: not taken).
        """

    async def renew_illustration(self, story_id: UUID, token: str, locked_until: datetime) -> bool:
        """Extends the lease of the claim `token`; False when it no longer holds it."""

    async def settle_illustration(
        self,
        story_id: UUID,
        token: str,
        illustration: StoredIllustration,
        *,
        retry_at: datetime | None = None,
    ) -> bool:
        """Records the outcome of the claim `token` and ends the claim.

        `ready` or `failed` are final; `pending` hands the picture back to be
        taken again after `retry_at`. False (nothing changed) when `token` no
        longer holds the picture.
        """

    async def pending_illustrations(self, now: datetime, limit: int) -> list[UUID]:
        """Pending pictures nobody holds at `now` (their lease lapsed), oldest first."""

    async def give_up_illustrations(self, now: datetime, max_attempts: int) -> int:
        """Marks failed the pending pictures nobody holds that were tried `max_attempts` times."""

    async def delete(self, story_id: UUID, owner: str) -> StoryRecord | None:
        """Deletes the story (and its Idempotency-Keys); returns what was deleted."""

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None: ...

    async def list_page(
        self, owner: str, limit: int, after: PageCursor | None = None
    ) -> StoryPage: ...

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]: ...

    async def count_created_since(self, owner: str, since: datetime) -> int:
        """How many stories `owner` has had stored since `since` (the daily quota)."""

    async def ping(self) -> float:
        """One round trip; returns its duration in milliseconds."""

    async def close(self) -> None: ...


C = TypeVar("C", bound=type)


def storage_errors(*outages: type[BaseException]) -> Callable[[C], C]:
    """Class decorator: bounds every public coroutine method by the instance's
    `operation_timeout` and turns outage errors into StorageUnavailableError.

    `outages` are the store's own "did not answer" errors; OSError and
    TimeoutError (which includes running out of `operation_timeout`) count for
    every store. The bound covers waiting for a pooled connection too
    (asyncpg's pool methods wait for one without limit). Constraint violations
    and bugs pass through unchanged: only "the store did not answer" becomes a
    503 for the caller.
    """
    caught: tuple[type[BaseException], ...] = (*outages, OSError, TimeoutError)

    def decorate(cls: C) -> C:
        for name, method in list(vars(cls).items()):
            if name.startswith("_") or not inspect.iscoroutinefunction(method):
                continue

            def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
                @functools.wraps(fn)
                async def translated(*args: Any, **kwargs: Any) -> Any:
                    try:
                        async with asyncio.timeout(getattr(args[0], "operation_timeout", None)):
                            return await fn(*args, **kwargs)
                    except caught as error:
                        raise StorageUnavailableError(
                            f"{cls.__name__}.{fn.__name__}: {error!r}"
                        ) from error

                return translated

            setattr(cls, name, wrap(method))
        return cls

    return decorate


STORY_COLUMNS = (
    "id, owner, title, paragraphs, prompt, age, length, language, provider, model, "
    "degraded, illustration_url, prompt_tokens, completion_tokens, generation_ms, created_at, "
    "illustrate, moderated_locally, illustration_status, illustration_key, "
    "illustration_media_type, illustration_bytes, illustration_width, illustration_height, "
    "illustration_sha256, illustration_attempts, illustration_error"
)
ENTRY_COLUMNS = "fingerprint, state, story_id, locked_until"

# Each store fills in its own placeholders ($1 or ?1) for p1..p7.
CLAIM_SQL = """
INSERT INTO idempotency_keys AS k
    (owner, key, fingerprint, state, story_id, claim_token, locked_until, created_at, expires_at)
VALUES ({p1}, {p2}, {p3}, 'pending', NULL, {p4}, {p5}, {p6}, {p7})
ON CONFLICT (owner, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'pending', story_id = NULL,
    claim_token = excluded.claim_token, locked_until = excluded.locked_until,
    created_at = excluded.created_at, expires_at = excluded.expires_at
WHERE k.expires_at < excluded.created_at
   OR (k.state = 'pending' AND k.locked_until < excluded.created_at
       AND k.fingerprint = excluded.fingerprint)
RETURNING owner
"""

# The statements below act only on the pending claim of one token (p1 owner,
# p2 key, p3 token): a request whose claim was taken over changes nothing.
RENEW_SQL = (
    "UPDATE idempotency_keys SET locked_until = {p4} "
    "WHERE owner = {p1} AND key = {p2} AND claim_token = {p3} AND state = 'pending'"
)
RELEASE_SQL = (
    "DELETE FROM idempotency_keys "
    "WHERE owner = {p1} AND key = {p2} AND claim_token = {p3} AND state = 'pending'"
)
DONE_SQL = (
    "UPDATE idempotency_keys SET state = 'done', story_id = {p4} "
    "WHERE owner = {p1} AND key = {p2} AND claim_token = {p3} AND state = 'pending'"
)


# The picture's columns, after the 18 first ones of STORY_COLUMNS.
ILLUSTRATION_SET = (
    "illustration_status = {p3}, illustration_key = {p4}, illustration_media_type = {p5}, "
    "illustration_bytes = {p6}, illustration_width = {p7}, illustration_height = {p8}, "
    "illustration_sha256 = {p9}, illustration_error = {p10}"
)
# p1 story, p2 token, p3.. the picture, p11 the retry time (NULL: final).
SETTLE_SQL = (
    f"UPDATE stories SET {ILLUSTRATION_SET}, illustration_claim = NULL, "  # noqa: S608
    "illustration_locked_until = {p11} "
    "WHERE id = {p1} AND illustration_claim = {p2} AND illustration_status = 'pending'"
)
# p1 story, p2 token, p3 now, p4 locked until, p5 max attempts.
CLAIM_ILLUSTRATION_SQL = (
    "UPDATE stories SET illustration_claim = {p2}, illustration_locked_until = {p4}, "  # noqa: S608
    "illustration_attempts = illustration_attempts + 1 "
    "WHERE id = {p1} AND illustration_status = 'pending' "
    "AND (illustration_locked_until IS NULL OR illustration_locked_until < {p3}) "
    "AND illustration_attempts < {p5} "
    f"RETURNING {STORY_COLUMNS}"
)
RENEW_ILLUSTRATION_SQL = (
    "UPDATE stories SET illustration_locked_until = {p3} "
    "WHERE id = {p1} AND illustration_claim = {p2} AND illustration_status = 'pending'"
)
# p1 now, p2 limit.
PENDING_ILLUSTRATIONS_SQL = (
    "SELECT id FROM stories WHERE illustration_status = 'pending' "
    "AND (illustration_locked_until IS NULL OR illustration_locked_until < {p1}) "
    "ORDER BY created_at LIMIT {p2}"
)
# p1 now, p2 max attempts.
GIVE_UP_ILLUSTRATIONS_SQL = (
    "UPDATE stories SET illustration_status = 'failed', illustration_claim = NULL, "
    "illustration_error = 'gave up after ' || illustration_attempts || ' attempts' "
    "WHERE illustration_status = 'pending' AND illustration_attempts >= {p2} "
    "AND (illustration_locked_until IS NULL OR illustration_locked_until < {p1})"
)


def illustration_of(row: Any) -> StoredIllustration | None:
    """The picture columns of a story row (asyncpg or SQLite): None when none was asked for."""
    status = row["illustration_status"]
    if status is None:
        return None
    return StoredIllustration(
        status=status,
        key=row["illustration_key"],
        media_type=row["illustration_media_type"],
        size_bytes=row["illustration_bytes"],
        width=row["illustration_width"],
        height=row["illustration_height"],
        sha256=row["illustration_sha256"],
        attempts=row["illustration_attempts"] or 0,
        error=row["illustration_error"],
    )


def illustration_values(picture: StoredIllustration | None) -> tuple[Any, ...]:
    """The picture columns (status .. error, as in STORY_COLUMNS) of a story to store."""
    if picture is None:
        return (None, None, None, None, None, None, None, 0, None)
    return (
        picture.status,
        picture.key,
        picture.media_type,
        picture.size_bytes,
        picture.width,
        picture.height,
        picture.sha256,
        picture.attempts,
        picture.error,
    )


def settled_values(picture: StoredIllustration) -> tuple[Any, ...]:
    """p3..p10 of SETTLE_SQL."""
    values = illustration_values(picture)
    return (*values[:7], values[8])


async def claim_or_read(
    claim: Callable[[], Awaitable[bool]],
    read: Callable[[], Awaitable[IdempotencyEntry | None]],
) -> IdempotencyEntry | None:
    """The steps of `claim_key` every store shares, around its own statements.

    `claim` runs the claim statement (True: this caller now holds the key);
    when it did not take, `read` fetches the entry holding the key. A pending
    claim released between the two (its request failed) leaves nothing to
    read: claim again. The store's `operation_timeout` bounds the whole loop.
    """
    while True:
        if await claim():
            return None
        entry = await read()
        if entry is not None:
            return entry


def page_of(rows: Sequence[StoryRecord], limit: int) -> StoryPage:
    items = tuple(rows[:limit])
    has_more = len(rows) > limit
    cursor = PageCursor(items[-1].created_at, items[-1].id) if has_more and items else None
    return StoryPage(items=items, next_cursor=cursor)


def migration_files(backend: str) -> list[tuple[str, str]]:
    """The migrations this build ships for `backend`: (version, SQL), by version.

    The version is the file name without `.sql` (`0001_stories`).
    """
    folder = resources.files("app.db") / "migrations" / backend
    return sorted(
        (entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )


@functools.cache
def migration_versions(backend: str) -> tuple[str, ...]:
    """The migration versions this build ships for `backend`, sorted (read once)."""
    return tuple(version for version, _ in migration_files(backend))
