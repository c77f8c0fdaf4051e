"""Where stories are kept: every SQL statement of the service lives in this module.

Two implementations of one contract (`StoryRepository`), checked by one contract
test suite run against both:

- `PostgresStoryRepository`: an asyncpg pool (`DATABASE_URL`), the production store.
- `SqliteStoryRepository`: an embedded file (`DATABASE_SQLITE_PATH`), the default
  when no database is configured, so the service runs out of the box.

Both apply versioned, idempotent migrations (`migrations/<backend>/NNNN_*.sql`)
at start; PostgreSQL under an advisory lock so replicas starting together do not
race.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar
from uuid import UUID

import aiosqlite
import asyncpg

from app.models import IdempotencyEntry, PageCursor, StoryPage, StoryRecord


class StorageUnavailableError(Exception):
    """The store did not answer (down, unreachable, timed out): nothing was changed."""


class ClaimLostError(Exception):
    """The Idempotency-Key this request held was taken over; its story was not stored."""


_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up
    asyncpg.exceptions.OperatorInterventionError,  # 57P01/57P02: shutting down, crashed
    asyncpg.exceptions.InsufficientResourcesError,  # 53300: too many connections
    asyncpg.InterfaceError,  # connection lost or closed under us
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    sqlite3.OperationalError,
    OSError,
    TimeoutError,
)

C = TypeVar("C", bound=type)


def _storage_errors(cls: C) -> C:
    """Bounds every public coroutine method by the instance's `operation_timeout`
    and turns outage errors into StorageUnavailableError.

    The bound covers waiting for a pooled connection too (asyncpg's pool methods
    wait for one without limit). Constraint violations and bugs pass through
    unchanged: only "the store did not answer" becomes a 503 for the caller.
    """
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(method):
            continue

        def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(fn)
            async def translated(*args: Any, **kwargs: Any) -> Any:
                try:
                    async with asyncio.timeout(getattr(args[0], "operation_timeout", None)):
                        return await fn(*args, **kwargs)
                except _STORAGE_ERRORS as error:
                    raise StorageUnavailableError(
                        f"{cls.__name__}.{fn.__name__}: {error!r}"
                    ) from error

            return translated

        setattr(cls, name, wrap(method))
    return cls


# Any fixed 64-bit number, the same in every replica.
_MIGRATION_LOCK_ID = 0x53_54_4F_52_59_5F_4D_47  # "STORY_MG"

_COLUMNS = (
    "id, owner, title, paragraphs, prompt, age, length, language, provider, model, "
    "degraded, illustration_url, prompt_tokens, completion_tokens, generation_ms, created_at, "
    "illustrate"
)


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
        claimed_until: datetime | None = None,
    ) -> None:
        """Stores the story; with a key, marks that key done in the same transaction.

        `claimed_until` is the `locked_until` of this request's claim: if the key
        was taken over since (a newer claim), nothing is stored (ClaimLostError).
        """

    async def claim_key(
        self,
        owner: str,
        key: str,
        fingerprint: str,
        *,
        now: datetime,
        locked_until: datetime,
        expires_at: datetime,
    ) -> IdempotencyEntry | None:
        """Claims an Idempotency-Key atomically across processes and replicas.

        Returns None when this caller now holds the key (new, expired, or a
        pending claim whose holder died, i.e. past `locked_until`, for the
        same request); otherwise the entry an earlier request left.
        """

    async def release_key(self, owner: str, key: str) -> None:
        """Drops a pending claim (its request failed), so a retry can run."""

    async def purge_expired_keys(self, now: datetime) -> int: ...

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None: ...

    async def list_page(
        self, owner: str, limit: int, after: PageCursor | None = None
    ) -> StoryPage: ...

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]: ...

    async def ping(self) -> float:
        """One round trip; returns its duration in milliseconds."""

    async def close(self) -> None: ...


_CLAIM_SQL = """
INSERT INTO idempotency_keys AS k
    (owner, key, fingerprint, state, story_id, locked_until, created_at, expires_at)
VALUES ({p1}, {p2}, {p3}, 'pending', NULL, {p4}, {p5}, {p6})
ON CONFLICT (owner, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'pending', story_id = NULL,
    locked_until = excluded.locked_until, created_at = excluded.created_at,
    expires_at = excluded.expires_at
WHERE k.expires_at < excluded.created_at
   OR (k.state = 'pending' AND k.locked_until < excluded.created_at
       AND k.fingerprint = excluded.fingerprint)
RETURNING owner
"""
_PG_CLAIM = _CLAIM_SQL.format(p1="$1", p2="$2", p3="$3", p4="$4", p5="$5", p6="$6")
_SQLITE_CLAIM = _CLAIM_SQL.format(p1="?", p2="?", p3="?", p4="?", p5="?", p6="?")
_ENTRY_COLUMNS = "fingerprint, state, story_id, locked_until"


def _migrations(backend: str) -> list[tuple[str, str]]:
    folder = resources.files("app.db") / "migrations" / backend
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return [(name.removesuffix(".sql"), sql) for name, sql in files]


def _page(rows: Sequence[StoryRecord], limit: int) -> StoryPage:
    items = tuple(rows[:limit])
    has_more = len(rows) > limit
    cursor = PageCursor(items[-1].created_at, items[-1].id) if has_more and items else None
    return StoryPage(items=items, next_cursor=cursor)


# ---------------------------------------------------------------- PostgreSQL


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
    )


@_storage_errors
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
            for version, sql in _migrations(self.backend):
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
        claimed_until: datetime | None = None,
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._insert(conn, story)
            if idempotency_key is not None:
                status = await conn.execute(
                    "UPDATE idempotency_keys SET state = 'done', story_id = $3 "
                    "WHERE owner = $1 AND key = $2 AND state = 'pending' AND locked_until = $4",
                    story.owner,
                    idempotency_key,
                    story.id,
                    claimed_until,
                )
                if status != "UPDATE 1":
                    raise ClaimLostError(idempotency_key)  # rolls the story back

    async def claim_key(
        self,
        owner: str,
        key: str,
        fingerprint: str,
        *,
        now: datetime,
        locked_until: datetime,
        expires_at: datetime,
    ) -> IdempotencyEntry | None:
        claimed = await self._pool.fetchval(
            _PG_CLAIM, owner, key, fingerprint, locked_until, now, expires_at
        )
        if claimed is not None:
            return None
        row = await self._pool.fetchrow(
            f"SELECT {_ENTRY_COLUMNS} FROM idempotency_keys "  # noqa: S608
            "WHERE owner = $1 AND key = $2",
            owner,
            key,
        )
        if row is None:  # released between our insert and this read: try again
            return await self.claim_key(
                owner, key, fingerprint, now=now, locked_until=locked_until, expires_at=expires_at
            )
        return IdempotencyEntry(
            fingerprint=row["fingerprint"],
            state=row["state"],
            story_id=row["story_id"],
            locked_until=row["locked_until"],
        )

    async def release_key(self, owner: str, key: str) -> None:
        await self._pool.execute(
            "DELETE FROM idempotency_keys WHERE owner = $1 AND key = $2 AND state = 'pending'",
            owner,
            key,
        )

    async def purge_expired_keys(self, now: datetime) -> int:
        result = await self._pool.execute("DELETE FROM idempotency_keys WHERE expires_at < $1", now)
        return int(result.split()[-1])

    @staticmethod
    async def _insert(conn: asyncpg.Connection, story: StoryRecord) -> None:
        await conn.execute(
            f"INSERT INTO stories ({_COLUMNS}) VALUES "  # noqa: S608 - constant column list
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
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
        )

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM stories WHERE id = $1 AND owner = $2",  # noqa: S608
            story_id,
            owner,
        )
        return _record_from_pg(row) if row else None

    async def list_page(self, owner: str, limit: int, after: PageCursor | None = None) -> StoryPage:
        if after is None:
            rows = await self._pool.fetch(
                f"SELECT {_COLUMNS} FROM stories WHERE owner = $1 "  # noqa: S608
                "ORDER BY created_at DESC, id DESC LIMIT $2",
                owner,
                limit + 1,
            )
        else:
            rows = await self._pool.fetch(
                f"SELECT {_COLUMNS} FROM stories WHERE owner = $1 "  # noqa: S608
                "AND (created_at, id) < ($2, $3) "
                "ORDER BY created_at DESC, id DESC LIMIT $4",
                owner,
                after.created_at,
                after.id,
                limit + 1,
            )
        return _page([_record_from_pg(r) for r in rows], limit)

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM stories WHERE owner = $1 "  # noqa: S608
            "AND age BETWEEN $2 AND $3 "
            "ORDER BY degraded ASC, abs(age - $4) ASC, created_at DESC LIMIT $5",
            owner,
            age - 1,
            age + 1,
            age,
            limit,
        )
        return [_record_from_pg(r) for r in rows]

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._pool.fetchval("SELECT 1")
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        await self._pool.close()


# ---------------------------------------------------------------- SQLite


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _record_from_sqlite(row: Any) -> StoryRecord:
    return StoryRecord(
        id=UUID(row["id"]),
        owner=row["owner"],
        title=row["title"],
        paragraphs=tuple(json.loads(row["paragraphs"])),
        prompt=row["prompt"],
        age=row["age"],
        length=row["length"],
        language=row["language"],
        provider=row["provider"],
        model=row["model"],
        degraded=bool(row["degraded"]),
        illustration_url=row["illustration_url"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        generation_ms=row["generation_ms"],
        created_at=datetime.fromisoformat(row["created_at"]),
        illustrate=bool(row["illustrate"]),
    )


@_storage_errors
class SqliteStoryRepository:
    """The embedded default: one WAL-mode SQLite file, one connection, no server."""

    backend = "sqlite"

    def __init__(self, conn: aiosqlite.Connection, *, operation_timeout: float = 10.0) -> None:
        self._conn = conn
        self.operation_timeout = operation_timeout
        # One connection is one transaction: writers take turns.
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteStoryRepository:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute("PRAGMA foreign_keys=ON")
        return cls(conn)

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        async with self._conn.execute("SELECT version FROM schema_migrations") as cursor:
            done = {row["version"] for row in await cursor.fetchall()}
        for version, sql in _migrations(self.backend):
            if version in done:
                continue
            await self._conn.executescript(sql)
            await self._conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, _iso(datetime.now(UTC))),
            )
            applied.append(version)
        await self._conn.commit()
        return applied

    async def applied_migrations(self) -> list[str]:
        async with self._conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version"
        ) as cursor:
            return [row["version"] for row in await cursor.fetchall()]

    async def add(
        self,
        story: StoryRecord,
        *,
        idempotency_key: str | None = None,
        claimed_until: datetime | None = None,
    ) -> None:
        async with self._write_lock:
            try:
                await self._insert(story)
                if idempotency_key is not None:
                    cursor = await self._conn.execute(
                        "UPDATE idempotency_keys SET state = 'done', story_id = ? "
                        "WHERE owner = ? AND key = ? AND state = 'pending' AND locked_until = ?",
                        (
                            str(story.id),
                            story.owner,
                            idempotency_key,
                            _iso(claimed_until) if claimed_until else None,
                        ),
                    )
                    if cursor.rowcount != 1:
                        raise ClaimLostError(idempotency_key)
                await self._conn.commit()
            except BaseException:
                await self._conn.rollback()
                raise

    async def claim_key(
        self,
        owner: str,
        key: str,
        fingerprint: str,
        *,
        now: datetime,
        locked_until: datetime,
        expires_at: datetime,
    ) -> IdempotencyEntry | None:
        async with self._write_lock:
            async with self._conn.execute(
                _SQLITE_CLAIM,
                (owner, key, fingerprint, _iso(locked_until), _iso(now), _iso(expires_at)),
            ) as cursor:
                claimed = await cursor.fetchone()
            await self._conn.commit()
        if claimed is not None:
            return None
        async with self._conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM idempotency_keys "  # noqa: S608
            "WHERE owner = ? AND key = ?",
            (owner, key),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:  # released between our insert and this read: try again
            return await self.claim_key(
                owner, key, fingerprint, now=now, locked_until=locked_until, expires_at=expires_at
            )
        return IdempotencyEntry(
            fingerprint=row["fingerprint"],
            state=row["state"],
            story_id=UUID(row["story_id"]) if row["story_id"] else None,
            locked_until=datetime.fromisoformat(row["locked_until"]),
        )

    async def release_key(self, owner: str, key: str) -> None:
        async with self._write_lock:
            await self._conn.execute(
                "DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND state = 'pending'",
                (owner, key),
            )
            await self._conn.commit()

    async def purge_expired_keys(self, now: datetime) -> int:
        async with self._write_lock:
            cursor = await self._conn.execute(
                "DELETE FROM idempotency_keys WHERE expires_at < ?", (_iso(now),)
            )
            await self._conn.commit()
        return int(cursor.rowcount)

    async def _insert(self, story: StoryRecord) -> None:
        await self._conn.execute(
            f"INSERT INTO stories ({_COLUMNS}) VALUES "  # noqa: S608 - constant column list
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(story.id),
                story.owner,
                story.title,
                json.dumps(list(story.paragraphs), ensure_ascii=False),
                story.prompt,
                story.age,
                story.length,
                story.language,
                story.provider,
                story.model,
                int(story.degraded),
                story.illustration_url,
                story.prompt_tokens,
                story.completion_tokens,
                story.generation_ms,
                _iso(story.created_at),
                int(story.illustrate),
            ),
        )

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None:
        async with self._conn.execute(
            f"SELECT {_COLUMNS} FROM stories WHERE id = ? AND owner = ?",  # noqa: S608
            (str(story_id), owner),
        ) as cursor:
            row = await cursor.fetchone()
        return _record_from_sqlite(row) if row else None

    async def list_page(self, owner: str, limit: int, after: PageCursor | None = None) -> StoryPage:
        if after is None:
            query = (
                f"SELECT {_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
                "ORDER BY created_at DESC, id DESC LIMIT ?"
            )
            params: tuple[Any, ...] = (owner, limit + 1)
        else:
            query = (
                f"SELECT {_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
                "AND (created_at < ? OR (created_at = ? AND id < ?)) "
                "ORDER BY created_at DESC, id DESC LIMIT ?"
            )
            when = _iso(after.created_at)
            params = (owner, when, when, str(after.id), limit + 1)
        async with self._conn.execute(query, params) as cursor:
            rows = await cursor.fetchall()
        return _page([_record_from_sqlite(r) for r in rows], limit)

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        async with self._conn.execute(
            f"SELECT {_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
            "AND age BETWEEN ? AND ? "
            "ORDER BY degraded ASC, abs(age - ?) ASC, created_at DESC LIMIT ?",
            (owner, age - 1, age + 1, age, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_record_from_sqlite(r) for r in rows]

    async def ping(self) -> float:
        started = time.perf_counter()
        async with self._conn.execute("SELECT 1") as cursor:
            await cursor.fetchone()
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        await self._conn.close()
