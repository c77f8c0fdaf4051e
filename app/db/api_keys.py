"""Where API keys are kept: the `api_keys` table (migration 0007), through a pool of its own.

Authentication reads a key's record on every request that carries one, so a
revocation holds on every worker from the next request. The stores here do not
share the story repository's connections: a story path that holds every pooled
connection (slow writes, a long recommendation query) must not make valid keys
wait, and a small pool of two is enough for single-row reads by primary key.

Both stores connect lazily and never raise their driver's errors to the
authenticator: a store that cannot answer is `ApiKeyStoreUnavailableError`
(a 503 with `Retry-After`, never a 401 for a key that may be valid). After a
failed connection, further attempts wait `retry_seconds`, so an outage does not
make every request pay a connection timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import asyncpg

from app.core.security.api_keys import ApiKeyRecord, ApiKeyStoreUnavailableError
from app.platform.config import Settings

T = TypeVar("T")

# Spelled out (no string building): every statement is a constant.
_PG_FIND = "SELECT id, name, secret_sha256, created_at, revoked_at FROM api_keys WHERE id = $1"
_PG_ADD = (
    "INSERT INTO api_keys (id, name, secret_sha256, created_at, revoked_at)"
    " VALUES ($1, $2, $3, $4, $5)"
)
_PG_LIST = (
    "SELECT id, name, secret_sha256, created_at, revoked_at FROM api_keys ORDER BY created_at, id"
)
_LITE_FIND = "SELECT id, name, secret_sha256, created_at, revoked_at FROM api_keys WHERE id = ?"
_LITE_ADD = (
    "INSERT INTO api_keys (id, name, secret_sha256, created_at, revoked_at) VALUES (?, ?, ?, ?, ?)"
)
_LITE_LIST = _PG_LIST


class _Lazy:
    """Connects on first use, once at a time; after a connection failure (at connect
    or on a pooled connection), no new attempt for `retry_seconds`."""

    def __init__(self, timeout_seconds: float, retry_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self._lock = asyncio.Lock()
        self._failed_at: float | None = None

    def check(self) -> None:
        if self._failed_at is not None and (
            time.monotonic() - self._failed_at < self.retry_seconds
        ):
            raise ApiKeyStoreUnavailableError("API key store unavailable (backing off)")

    def failed(self) -> None:
        self._failed_at = time.monotonic()

    def answered(self) -> None:
        self._failed_at = None

    async def guarded(self, connect: Callable[[], Awaitable[None]]) -> None:
        async with self._lock:
            self.check()
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    await connect()
            except Exception as error:
                self.failed()
                reason = f"cannot connect: {type(error).__name__}"
                raise ApiKeyStoreUnavailableError(reason) from None


class PostgresApiKeyStore:
    def __init__(
        self, url: str, *, timeout_seconds: float = 2.0, retry_seconds: float = 1.0
    ) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None
        self._lazy = _Lazy(timeout_seconds, retry_seconds)
        self.timeout_seconds = timeout_seconds

    async def _connect(self) -> None:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=2, timeout=self.timeout_seconds
            )

    async def _run(self, operation: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        self._lazy.check()
        if self._pool is None:
            await self._lazy.guarded(self._connect)
        assert self._pool is not None
        try:
            async with asyncio.timeout(self.timeout_seconds):
                result = await operation(self._pool)
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError) as error:
            self._lazy.failed()  # unreachable: back off before the next attempt
            raise ApiKeyStoreUnavailableError(type(error).__name__) from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise ApiKeyStoreUnavailableError(type(error).__name__) from None
        self._lazy.answered()
        return result

    async def find(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._run(lambda pool: pool.fetchrow(_PG_FIND, key_id))
        return None if row is None else ApiKeyRecord(**dict(row))

    async def add(self, record: ApiKeyRecord) -> None:
        await self._run(
            lambda pool: pool.execute(
                _PG_ADD,
                record.id,
                record.name,
                record.secret_sha256,
                record.created_at,
                record.revoked_at,
            )
        )

    async def revoke(self, key_id: str, at: datetime) -> bool:
        status = await self._run(
            lambda pool: pool.execute(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                key_id,
                at,
            )
        )
        return str(status).endswith(" 1")

    async def list_keys(self) -> list[ApiKeyRecord]:
        rows = await self._run(lambda pool: pool.fetch(_PG_LIST))
        return [ApiKeyRecord(**dict(row)) for row in rows]

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


class SqliteApiKeyStore:
    """The same table in the embedded SQLite file, through a connection of its own
    (WAL mode: reads do not wait for the story path's writes)."""

    def __init__(
        self, path: Path, *, timeout_seconds: float = 2.0, retry_seconds: float = 1.0
    ) -> None:
        self._path = path
        self._conn: aiosqlite.Connection | None = None
        self._lazy = _Lazy(timeout_seconds, retry_seconds)
        self.timeout_seconds = timeout_seconds

    async def _connect(self) -> None:
        if self._conn is None:
            conn = await aiosqlite.connect(self._path)
            conn.row_factory = aiosqlite.Row
            await conn.execute(f"PRAGMA busy_timeout={int(self.timeout_seconds * 1000)}")
            self._conn = conn

    async def _run(self, operation: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        self._lazy.check()
        if self._conn is None:
            await self._lazy.guarded(self._connect)
        assert self._conn is not None
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await operation(self._conn)
        except (TimeoutError, OSError, aiosqlite.Error) as error:
            raise ApiKeyStoreUnavailableError(type(error).__name__) from None

    async def find(self, key_id: str) -> ApiKeyRecord | None:
        async def read(conn: aiosqlite.Connection) -> Any:
            async with conn.execute(_LITE_FIND, (key_id,)) as cursor:
                return await cursor.fetchone()

        row = await self._run(read)
        return None if row is None else _from_sqlite(row)

    async def add(self, record: ApiKeyRecord) -> None:
        async def write(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                _LITE_ADD,
                (
                    record.id,
                    record.name,
                    record.secret_sha256,
                    record.created_at.isoformat(),
                    record.revoked_at.isoformat() if record.revoked_at else None,
                ),
            )
            await conn.commit()

        await self._run(write)

    async def revoke(self, key_id: str, at: datetime) -> bool:
        async def write(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (at.isoformat(), key_id),
            )
            await conn.commit()
            return cursor.rowcount

        return await self._run(write) == 1

    async def list_keys(self) -> list[ApiKeyRecord]:
        async def read(conn: aiosqlite.Connection) -> Any:
            async with conn.execute(_LITE_LIST) as cursor:
                return await cursor.fetchall()

        return [_from_sqlite(row) for row in await self._run(read)]

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


def _from_sqlite(row: Any) -> ApiKeyRecord:
    revoked = row["revoked_at"]
    return ApiKeyRecord(
        id=row["id"],
        name=row["name"],
        secret_sha256=row["secret_sha256"],
        created_at=datetime.fromisoformat(row["created_at"]),
        revoked_at=datetime.fromisoformat(revoked) if revoked else None,
    )


def open_api_key_store(settings: Settings) -> PostgresApiKeyStore | SqliteApiKeyStore:
    """The store next to the stories: PostgreSQL with `DATABASE_URL`, else the SQLite file."""
    db = settings.database
    timeout = min(db.connect_timeout_seconds, 2.0)
    if db.url is not None:
        return PostgresApiKeyStore(db.url.get_secret_value(), timeout_seconds=timeout)
    return SqliteApiKeyStore(db.sqlite_path, timeout_seconds=timeout)
