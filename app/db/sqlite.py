"""The embedded default store: one SQLite file through aiosqlite (`DATABASE_SQLITE_PATH`).

Implements `app.db.repository.StoryRepository` when no database is configured,
so the service runs out of the box. Times are stored as UTC ISO-8601 text, ids
as text, paragraphs as a JSON array.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import aiosqlite

from app.db.repository import (
    CLAIM_SQL,
    DONE_SQL,
    ENTRY_COLUMNS,
    RELEASE_SQL,
    RENEW_SQL,
    STORY_COLUMNS,
    ClaimLostError,
    claim_or_read,
    migration_files,
    page_of,
    storage_errors,
)
from app.models import IdempotencyEntry, PageCursor, StoryPage, StoryRecord

_PLACEHOLDERS = {f"p{n}": f"?{n}" for n in range(1, 8)}  # numbered: used out of order
_CLAIM = CLAIM_SQL.format(**_PLACEHOLDERS)
_RENEW = RENEW_SQL.format(**_PLACEHOLDERS)
_RELEASE = RELEASE_SQL.format(**_PLACEHOLDERS)
_DONE = DONE_SQL.format(**_PLACEHOLDERS)


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
            except BaseException:
                await self._conn.rollback()
                raise
            applied.append(version)
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
        claim_token: str | None = None,
    ) -> None:
        async with self._write_lock:
            try:
                await self._insert(story)
                if idempotency_key is not None:
                    cursor = await self._conn.execute(
                        _DONE, (story.owner, idempotency_key, claim_token, str(story.id))
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
        token: str,
        now: datetime,
        locked_until: datetime,
        expires_at: datetime,
    ) -> IdempotencyEntry | None:
        params = (owner, key, fingerprint, token, _iso(locked_until), _iso(now), _iso(expires_at))

        async def claim() -> bool:
            async with self._write_lock:
                async with self._conn.execute(_CLAIM, params) as cursor:
                    claimed = await cursor.fetchone()
                await self._conn.commit()
            return claimed is not None

        return await claim_or_read(claim, lambda: self._read_entry(owner, key))

    async def renew_key(self, owner: str, key: str, token: str, *, locked_until: datetime) -> bool:
        async with self._write_lock:
            cursor = await self._conn.execute(_RENEW, (owner, key, token, _iso(locked_until)))
            await self._conn.commit()
        return bool(cursor.rowcount == 1)

    async def read_key(self, owner: str, key: str) -> IdempotencyEntry | None:
        return await self._read_entry(owner, key)

    async def _read_entry(self, owner: str, key: str) -> IdempotencyEntry | None:
        async with self._conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM idempotency_keys "  # noqa: S608
            "WHERE owner = ? AND key = ?",
            (owner, key),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return IdempotencyEntry(
            fingerprint=row["fingerprint"],
            state=row["state"],
            story_id=UUID(row["story_id"]) if row["story_id"] else None,
            locked_until=datetime.fromisoformat(row["locked_until"]),
        )

    async def release_key(self, owner: str, key: str, token: str) -> None:
        async with self._write_lock:
            await self._conn.execute(_RELEASE, (owner, key, token))
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
            f"INSERT INTO stories ({STORY_COLUMNS}) VALUES "  # noqa: S608 - constant column list
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    async def get(self, story_id: UUID, owner: str) -> StoryRecord | None:
        async with self._conn.execute(
            f"SELECT {STORY_COLUMNS} FROM stories WHERE id = ? AND owner = ?",  # noqa: S608
            (str(story_id), owner),
        ) as cursor:
            row = await cursor.fetchone()
        return _record_from_sqlite(row) if row else None

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
        async with self._conn.execute(query, params) as cursor:
            rows = await cursor.fetchall()
        return page_of([_record_from_sqlite(r) for r in rows], limit)

    async def recommend(self, owner: str, age: int, limit: int) -> list[StoryRecord]:
        async with self._conn.execute(
            f"SELECT {STORY_COLUMNS} FROM stories WHERE owner = ? "  # noqa: S608
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
