"""The embedded default store: one SQLite file through aiosqlite (`DATABASE_SQLITE_PATH`).

Implements `app.db.repository.StoryRepository` when no database is configured,
so the service runs out of the box. Times are stored as UTC ISO-8601 text, ids
as text, paragraphs as a JSON array.

aiosqlite runs every call on the connection's own thread; each call is a trip
there and back (a queue, a wake-up of the event loop, and the GIL handed over
twice, which under load waits up to the interpreter's 5 ms switch interval).
So an operation makes ONE trip: a read is `execute_fetchall` (not execute,
fetch, close: three), and a write runs all its statements and the commit in one
function on that thread (`_transaction`), not one trip per statement. Measured
in `bench/bench_hot_paths.py` (docs/benchmarks.md, "SQLite path").
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import aiosqlite

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

_PLACEHOLDERS = {f"p{n}": f"?{n}" for n in range(1, 12)}  # numbered: used out of order
_CLAIM = CLAIM_SQL.format(**_PLACEHOLDERS)
_RENEW = RENEW_SQL.format(**_PLACEHOLDERS)
_RELEASE = RELEASE_SQL.format(**_PLACEHOLDERS)
_DONE = DONE_SQL.format(**_PLACEHOLDERS)
_CLAIM_ILLUSTRATION = CLAIM_ILLUSTRATION_SQL.format(**_PLACEHOLDERS)
_RENEW_ILLUSTRATION = RENEW_ILLUSTRATION_SQL.format(**_PLACEHOLDERS)
_SETTLE = SETTLE_SQL.format(**_PLACEHOLDERS)
_PENDING_ILLUSTRATIONS = PENDING_ILLUSTRATIONS_SQL.format(**_PLACEHOLDERS)
_GIVE_UP_ILLUSTRATIONS = GIVE_UP_ILLUSTRATIONS_SQL.format(**_PLACEHOLDERS)


T = TypeVar("T")


def _committed(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work(db)` then commit, or roll back on any error (on the connection's thread)."""
    try:
        result = work(db)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return result


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
        moderated_locally=(
            None if row["moderated_locally"] is None else bool(row["moderated_locally"])
        ),
        illustration=illustration_of(row),
    )


@storage_errors(sqlite3.OperationalError)
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
        connecting = aiosqlite.connect(path)
        try:
            conn = await connecting
        except BaseException:
            # aiosqlite stops its thread after a failed connect but does not wait
            # for it; wait here, while the loop is open, or the thread reports its
            # stop to a closed loop and prints a traceback as the process exits.
            thread = getattr(connecting, "_thread", None)
            if isinstance(thread, threading.Thread) and thread.is_alive():
                await asyncio.to_thread(thread.join, 5.0)
            raise
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
        for version, sql in migration_files(self.backend):
            if version in done:
                continue
            # One transaction per migration, with the row recording it: SQLite
            # has no ADD COLUMN IF NOT EXISTS, so a migration must never be left
            # applied but unrecorded (the next start would fail on it).
            # executescript commits what is pending, then runs the script as
            # given, which opens the transaction; the commit below ends it.
            try:
                await self._conn.executescript(f"BEGIN IMMEDIATE;\n{sql}")
                await self._conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, _iso(datetime.now(UTC))),
                )
                await self._conn.commit()
            except BaseException as error:
                await self._conn.rollback()
                # Several workers start on one file at once: another one may have
                # applied this version while we waited for the write lock (our
                # script then failed on its changes). Then it is done, not failed.
                if isinstance(error, Exception) and await self._recorded(version):
                    continue
                raise
            applied.append(version)
        return applied

    async def _recorded(self, version: str) -> bool:
        async with self._conn.execute(
            "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
        ) as cursor:
            return await cursor.fetchone() is not None

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
        claim_token: str | None = None,
    ) -> None:
        def work(db: sqlite3.Connection) -> None:
            self._insert(db, story)
            if idempotency_key is not None:
                cursor = db.execute(
                    _DONE, (story.owner, idempotency_key, claim_token, str(story.id))
                )
                if cursor.rowcount != 1:
                    raise ClaimLostError(idempotency_key)

        await self._transaction(work)

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
        params = (owner, key, fingerprint, token, _iso(locked_until), _iso(now), _iso(expires_at))

        async def claim() -> bool:
            claimed = await self._transaction(lambda db: db.execute(_CLAIM, params).fetchone())
            return claimed is not None

        return await claim_or_read(claim, lambda: self._read_entry(owner, key))

    async def renew_key(self, owner: str, key: str, token: str, *, locked_until: datetime) -> bool:
        params = (owner, key, token, _iso(locked_until))
        return await self._transaction(lambda db: db.execute(_RENEW, params).rowcount == 1)

    async def read_key(self, owner: str, key: str) -> IdempotencyEntry | None:
        return await self._read_entry(owner, key)

    async def _read_entry(self, owner: str, key: str) -> IdempotencyEntry | None:
        rows = await self._rows(
            f"SELECT {ENTRY_COLUMNS} FROM idempotency_keys "  # noqa: S608
            "WHERE owner = ? AND key = ?",
            (owner, key),
        )
        if not rows:
            return None
        row = rows[0]
        return IdempotencyEntry(
            fingerprint=row["fingerprint"],
            state=row["state"],
            story_id=UUID(row["story_id"]) if row["story_id"] else None,
            locked_until=datetime.fromisoformat(row["locked_until"]),
        )

    async def release_key(self, owner: str, key: str, token: str) -> None:
        await self._transaction(lambda db: db.execute(_RELEASE, (owner, key, token)))

    async def purge_expired_keys(self, now: datetime) -> int:
        purge = "DELETE FROM idempotency_keys WHERE expires_at < ?"
        return await self._transaction(lambda db: int(db.execute(purge, (_iso(now),)).rowcount))

    async def _rows(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        """A read in one trip to the connection's thread (execute, fetch all, close)."""
        return list(await self._conn.execute_fetchall(sql, params))

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the sqlite3 connection, then commit (rollback on error): all in ONE
        trip to the connection's thread. Writers take turns (one connection is one
        transaction; the lock also keeps this out of a multi-call write's middle)."""
        conn = self._conn

        def run() -> T:
            return _committed(conn._conn, work)  # on aiosqlite's own thread

        async with self._write_lock:
            # aiosqlite's queue to its thread: the public calls are one statement each.
            result: T = await conn._execute(run)  # type: ignore[no-untyped-call]
            return result

    @staticmethod
    def _insert(db: sqlite3.Connection, story: StoryRecord) -> None:
        """On the connection's thread, inside `_transaction`."""
        db.execute(
            f"INSERT INTO stories ({STORY_COLUMNS}) VALUES "  # noqa: S608 - constant column list
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                None if story.moderated_locally is None else int(story.moderated_locally),
                *illustration_values(story.illustration),
            ),
        )

    async def claim_illustration(
        self,
        story_id: UUID,
        *,
        token: str,
        now: datetime,
        locked_until: datetime,
        max_attempts: int,
    ) -> StoryRecord | None:
        params = (str(story_id), token, _iso(now), _iso(locked_until), max_attempts)
        async with self._write_lock:
            async with self._conn.execute(_CLAIM_ILLUSTRATION, params) as cursor:
                row = await cursor.fetchone()
            await self._conn.commit()
        return _record_from_sqlite(row) if row else None

    async def renew_illustration(self, story_id: UUID, token: str, locked_until: datetime) -> bool:
        return await self._change(_RENEW_ILLUSTRATION, (str(story_id), token, _iso(locked_until)))

    async def settle_illustration(
        self,
        story_id: UUID,
        token: str,
        illustration: StoredIllustration,
        *,
        retry_at: datetime | None = None,
    ) -> bool:
        retry = None if retry_at is None else _iso(retry_at)
        params = (str(story_id), token, *settled_values(illustration), retry)
        return await self._change(_SETTLE, params)

    async def _change(self, sql: str, params: tuple[Any, ...]) -> bool:
        async with self._write_lock:
            cursor = await self._conn.execute(sql, params)
            await self._conn.commit()
        return bool(cursor.rowcount == 1)

    async def pending_illustrations(self, now: datetime, limit: int) -> list[UUID]:
        async with self._conn.execute(_PENDING_ILLUSTRATIONS, (_iso(now), limit)) as cursor:
            return [UUID(row["id"]) for row in await cursor.fetchall()]

    async def give_up_illustrations(self, now: datetime, max_attempts: int) -> int:
        async with self._write_lock:
            cursor = await self._conn.execute(_GIVE_UP_ILLUSTRATIONS, (_iso(now), max_attempts))
            await self._conn.commit()
        return int(cursor.rowcount)

    async def delete(self, story_id: UUID, owner: str) -> StoryRecord | None:
        async with self._write_lock:
            async with self._conn.execute(
                f"DELETE FROM stories WHERE id = ? AND owner = ? RETURNING {STORY_COLUMNS}",  # noqa: S608
                (str(story_id), owner),
            ) as cursor:
                row = await cursor.fetchone()
            await self._conn.commit()
        return _record_from_sqlite(row) if row else None

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None:
        rows = await self._rows(
            f"SELECT {STORY_COLUMNS} FROM stories WHERE id = ? AND owner = ?",  # noqa: S608
            (str(story_id), owner),
        )
        return _record_from_sqlite(rows[0]) if rows else None

    async def list_page(self, owner: str, limit: int, after: PageCursor | None = None) -> StoryPage:
        if after is None:
            query = (
                f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
                "ORDER BY created_at DESC, id DESC LIMIT ?"
            )
            params: tuple[Any, ...] = (owner, limit + 1)
        else:
            query = (
                f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
                "AND (created_at < ? OR (created_at = ? AND id < ?)) "
                "ORDER BY created_at DESC, id DESC LIMIT ?"
            )
            when = _iso(after.created_at)
            params = (owner, when, when, str(after.id), limit + 1)
        rows = await self._rows(query, params)
        return page_of([_record_from_sqlite(r) for r in rows], limit)

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        rows = await self._rows(
            f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
            "AND age BETWEEN ? AND ? "
            "ORDER BY degraded ASC, abs(age - ?) ASC, created_at DESC LIMIT ?",
            (owner, age - 1, age + 1, age, limit),
        )
        return [_record_from_sqlite(r) for r in rows]

    async def count_created_since(self, owner: str, since: datetime) -> int:
        # created_at is ISO 8601 in UTC (`_iso`): text order is time order.
        async with self._conn.execute(
            "SELECT count(*) FROM stories WHERE owner = ? AND created_at >= ?",
            (owner, _iso(since)),
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._rows("SELECT 1", ())
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        await self._conn.close()
