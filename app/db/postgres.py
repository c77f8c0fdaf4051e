"""The production store: PostgreSQL through an asyncpg pool (`DATABASE_URL`).

Implements `app.db.repository.StoryRepository`. Migrations run under an
advisory lock, so replicas starting together do not race.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from app.db.repository import (
    CLAIM_ILLUSTRATION_SQL,
    CLAIM_SQL,
    DONE_SQL,
    ENTRY_COLUMNS,
    GIVE_UP_ILLUSTRATIONS_SQL,
    PENDING_ILLUSTRATIONS_SQL,
    RELEASE_SQL,
    RENEW_ILLUSTRATION_SQL,
    RENEW_SQL,
    SETTLE_SQL,
    STORY_COLUMNS,
    ClaimLostError,
    claim_or_read,
    illustration_of,
    illustration_values,
    migration_files,
    page_of,
    settled_values,
    storage_errors,
)
from app.models import IdempotencyEntry, PageCursor, StoredIllustration, StoryPage, StoryRecord

# Any fixed 64-bit number, the same in every replica.
_MIGRATION_LOCK_ID = 0x53_54_4F_52_59_5F_4D_47  # "STORY_MG"

_PLACEHOLDERS = {f"p{n}": f"${n}" for n in range(1, 12)}
_CLAIM = CLAIM_SQL.format(**_PLACEHOLDERS)
_RENEW = RENEW_SQL.format(**_PLACEHOLDERS)
_RELEASE = RELEASE_SQL.format(**_PLACEHOLDERS)
_CLAIM_ILLUSTRATION = CLAIM_ILLUSTRATION_SQL.format(**_PLACEHOLDERS)
_RENEW_ILLUSTRATION = RENEW_ILLUSTRATION_SQL.format(**_PLACEHOLDERS)
_SETTLE = SETTLE_SQL.format(**_PLACEHOLDERS)
_PENDING_ILLUSTRATIONS = PENDING_ILLUSTRATIONS_SQL.format(**_PLACEHOLDERS)
_GIVE_UP_ILLUSTRATIONS = GIVE_UP_ILLUSTRATIONS_SQL.format(**_PLACEHOLDERS)

# $1..$27: the story, in the order of STORY_COLUMNS, each cast to its column's type
# (see migrations/postgres), as a bare `SELECT $n` has no column to type $n by.
_STORY_VALUES = (
    "$1::uuid, $2::text, $3::text, $4::text[], $5::text, $6::smallint, $7::text, $8::text, "
    "$9::text, $10::text, $11::boolean, $12::text, $13::integer, $14::integer, $15::integer, "
    "$16::timestamptz, $17::boolean, $18::boolean, $19::text, $20::text, $21::text, "
    "$22::integer, $23::integer, $24::integer, $25::text, $26::integer, $27::text"
)
_INSERT = f"INSERT INTO stories ({STORY_COLUMNS}) VALUES ({_STORY_VALUES})"  # noqa: S608
# One statement, so one round trip: the story is stored only if DONE_SQL (owner $2, key $28,
# token $29, story $1) marks its claim done, and the claim is marked only if the story is stored.
_INSERT_DONE = (
    f"WITH done AS ({DONE_SQL.format(p1='$2', p2='$28', p3='$29', p4='$1')} RETURNING 1) "  # noqa: S608
    f"INSERT INTO stories ({STORY_COLUMNS}) SELECT {_STORY_VALUES} "
    "WHERE EXISTS (SELECT 1 FROM done)"
)

_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up
    asyncpg.exceptions.OperatorInterventionError,  # 57P01/57P02: shutting down, crashed
    asyncpg.exceptions.InsufficientResourcesError,  # 53300: too many connections
    asyncpg.InterfaceError,  # connection lost or closed under us
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
)


def _record_from_pg(row: asyncpg.Record) -> StoryRecord:
    return StoryRecord(
        id=row["id"],
        owner=row["owner"],
        title=row["title"],
        paragraphs=tuple(row["paragraphs"]),
        prompt=row["prompt"],
        age=row["age"],
        length=row["length"],
        language=row["language"],
        provider=row["provider"],
        model=row["model"],
        degraded=row["degraded"],
        illustration_url=row["illustration_url"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        generation_ms=row["generation_ms"],
        created_at=row["created_at"],
        illustrate=row["illustrate"],
        moderated_locally=row["moderated_locally"],
        illustration=illustration_of(row),
    )


def _story_values(story: StoryRecord) -> tuple[Any, ...]:
    """$1..$27 of _INSERT and _INSERT_DONE, in the order of STORY_COLUMNS."""
    return (
        story.id,
        story.owner,
        story.title,
        list(story.paragraphs),
        story.prompt,
        story.age,
        story.length,
        story.language,
        story.provider,
        story.model,
        story.degraded,
        story.illustration_url,
        story.prompt_tokens,
        story.completion_tokens,
        story.generation_ms,
        story.created_at,
        story.illustrate,
        story.moderated_locally,
        *illustration_values(story.illustration),
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, minus its round trip.

    asyncpg's default sends `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL` each time a connection goes back, and the caller holds the connection
    until it answers: a second round trip per operation, which a busy worker pays
    as a pool twice as small. This repository leaves nothing in the session to
    reset (no session SET, LISTEN, cursor or session advisory lock; the migration
    lock is `pg_advisory_xact_lock`, gone with its transaction), and asyncpg still
    rolls back an open transaction before calling this.
    """


@storage_errors(*_OUTAGES)
class PostgresStoryRepository:
    backend = "postgres"

    def __init__(self, pool: asyncpg.Pool, *, operation_timeout: float | None = None) -> None:
        self._pool = pool
        self.operation_timeout = operation_timeout

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        command_timeout: float,
        connect_timeout: float,
    ) -> PostgresStoryRepository:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            reset=_keep_session,
        )
        return cls(pool, operation_timeout=connect_timeout + command_timeout)

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, sql in migration_files(self.backend):
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
        return applied

    async def applied_migrations(self) -> list[str]:
        rows = await self._pool.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [row["version"] for row in rows]

    async def add(
        self,
        story: StoryRecord,
        *,
        idempotency_key: str | None = None,
        claim_token: str | None = None,
    ) -> None:
        if idempotency_key is None:
            await self._pool.execute(_INSERT, *_story_values(story))
            return
        status = await self._pool.execute(
            _INSERT_DONE, *_story_values(story), idempotency_key, claim_token
        )
        if status != "INSERT 0 1":
            raise ClaimLostError(idempotency_key)  # nothing was stored

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
        async def claim() -> bool:
            claimed = await self._pool.fetchval(
                _CLAIM, owner, key, fingerprint, token, locked_until, now, expires_at
            )
            return claimed is not None

        return await claim_or_read(claim, lambda: self._read_entry(owner, key))

    async def renew_key(self, owner: str, key: str, token: str, *, locked_until: datetime) -> bool:
        status = await self._pool.execute(_RENEW, owner, key, token, locked_until)
        return bool(status == "UPDATE 1")

    async def read_key(self, owner: str, key: str) -> IdempotencyEntry | None:
        return await self._read_entry(owner, key)

    async def _read_entry(self, owner: str, key: str) -> IdempotencyEntry | None:
        row = await self._pool.fetchrow(
            f"SELECT {ENTRY_COLUMNS} FROM idempotency_keys "  # noqa: S608
            "WHERE owner = $1 AND key = $2",
            owner,
            key,
        )
        if row is None:
            return None
        return IdempotencyEntry(
            fingerprint=row["fingerprint"],
            state=row["state"],
            story_id=row["story_id"],
            locked_until=row["locked_until"],
        )

    async def release_key(self, owner: str, key: str, token: str) -> None:
        await self._pool.execute(_RELEASE, owner, key, token)

    async def purge_expired_keys(self, now: datetime) -> int:
        result = await self._pool.execute("DELETE FROM idempotency_keys WHERE expires_at < $1", now)
        return int(result.split()[-1])

    async def claim_illustration(
        self,
        story_id: UUID,
        *,
        token: str,
        now: datetime,
        locked_until: datetime,
        max_attempts: int,
    ) -> StoryRecord | None:
        row = await self._pool.fetchrow(
            _CLAIM_ILLUSTRATION, story_id, token, now, locked_until, max_attempts
        )
        return _record_from_pg(row) if row else None

    async def renew_illustration(self, story_id: UUID, token: str, locked_until: datetime) -> bool:
        status = await self._pool.execute(_RENEW_ILLUSTRATION, story_id, token, locked_until)
        return bool(status == "UPDATE 1")

    async def settle_illustration(
        self,
        story_id: UUID,
        token: str,
        illustration: StoredIllustration,
        *,
        retry_at: datetime | None = None,
    ) -> bool:
        status = await self._pool.execute(
            _SETTLE, story_id, token, *settled_values(illustration), retry_at
        )
        return bool(status == "UPDATE 1")

    async def pending_illustrations(self, now: datetime, limit: int) -> list[UUID]:
        rows = await self._pool.fetch(_PENDING_ILLUSTRATIONS, now, limit)
        return [row["id"] for row in rows]

    async def give_up_illustrations(self, now: datetime, max_attempts: int) -> int:
        result = await self._pool.execute(_GIVE_UP_ILLUSTRATIONS, now, max_attempts)
        return int(result.split()[-1])

    async def delete(self, story_id: UUID, owner: str) -> StoryRecord | None:
        row = await self._pool.fetchrow(
            f"DELETE FROM stories WHERE id = $1 AND owner = $2 RETURNING {STORY_COLUMNS}",  # noqa: S608
            story_id,
            owner,
        )
        return _record_from_pg(row) if row else None

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {STORY_COLUMNS} FROM stories WHERE id = $1 AND owner = $2",  # noqa: S608
            story_id,
            owner,
        )
        return _record_from_pg(row) if row else None

    async def list_page(self, owner: str, limit: int, after: PageCursor | None = None) -> StoryPage:
        if after is None:
            rows = await self._pool.fetch(
                f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = $1 "  # noqa: S608
                "ORDER BY created_at DESC, id DESC LIMIT $2",
                owner,
                limit + 1,
            )
        else:
            rows = await self._pool.fetch(
                f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = $1 "  # noqa: S608
                "AND (created_at, id) < ($2, $3) "
                "ORDER BY created_at DESC, id DESC LIMIT $4",
                owner,
                after.created_at,
                after.id,
                limit + 1,
            )
        return page_of([_record_from_pg(r) for r in rows], limit)

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        rows = await self._pool.fetch(
            f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = $1 "  # noqa: S608
            "AND age BETWEEN $2 AND $3 "
            "ORDER BY degraded ASC, abs(age - $4) ASC, created_at DESC LIMIT $5",
            owner,
            age - 1,
            age + 1,
            age,
            limit,
        )
        return [_record_from_pg(r) for r in rows]

    async def count_created_since(self, owner: str, since: datetime) -> int:
        count = await self._pool.fetchval(
            "SELECT count(*) FROM stories WHERE owner = $1 AND created_at >= $2", owner, since
        )
        return int(count)

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._pool.fetchval("SELECT 1")
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        await self._pool.close()
