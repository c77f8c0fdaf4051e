"""Shared fixtures: real Redis and PostgreSQL, and the fake upstream servers.

Tests that need Redis or PostgreSQL skip with the reason when the server does not
answer on a developer's machine; under `CI=true` the same absence fails the run,
so CI can never go green by skipping the real-dependency tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis

from app.db.postgres import PostgresStoryRepository
from app.db.repository import StoryRepository
from app.db.sqlite import SqliteStoryRepository

pytest_plugins = ["tests.fakes.plugin"]

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REDIS_TEST_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")
POSTGRES_TEST_URL = os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test")


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs a coroutine to completion on a private thread and loop.

    Session fixtures may be first requested from inside a running event loop
    (an async test or fixture), where `asyncio.run` is not allowed.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _unavailable(what: str, url: str, error: BaseException) -> None:
    reason = f"{what} not reachable at {url}: {error!r}"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: real-dependency tests must run, not skip)")
    pytest.skip(reason)


async def _ping_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        await client.ping()
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real Redis database reserved for tests (flushed around each test).

    Two test runs at once against the same Redis database disturb each other
    (each flushes it): give a second run its own `REDIS_TEST_URL` (e.g. /14).
    """
    try:
        run_sync(lambda: _ping_redis(REDIS_TEST_URL))
    except Exception as error:  # any failure to answer means "not available"
        _unavailable("Redis", REDIS_TEST_URL, error)
    return REDIS_TEST_URL


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=2)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=2)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a scratch PostgreSQL database created for this test session."""
    name = f"story_test_{secrets.token_hex(4)}"
    try:
        run_sync(lambda: _create_database(POSTGRES_TEST_URL, name))
    except Exception as error:
        _unavailable("PostgreSQL", POSTGRES_TEST_URL, error)
    base, _, _ = POSTGRES_TEST_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        run_sync(lambda: _drop_database(POSTGRES_TEST_URL, name))


async def _truncate_all(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'"
        )
        if tables:
            names = ", ".join(f'"{row["tablename"]}"' for row in tables)
            await conn.execute(f"TRUNCATE {names} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def clean_postgres(postgres_url: str) -> str:
    """The scratch database with every table emptied before the test.

    Synchronous on purpose: parametrized fixtures reach it through
    `request.getfixturevalue`, which cannot set up an async fixture.
    """
    run_sync(lambda: _truncate_all(postgres_url))
    return postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
async def repository(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoryRepository]:
    """A migrated story repository on each backend in turn (the contract runs on both)."""
    repo: StoryRepository
    if request.param == "postgres":
        url: str = request.getfixturevalue("clean_postgres")
        repo = await PostgresStoryRepository.connect(
            url, min_size=1, max_size=4, command_timeout=5, connect_timeout=5
        )
    else:
        repo = await SqliteStoryRepository.open(tmp_path / "stories.sqlite3")
    await repo.migrate()
    try:
        yield repo
    finally:
        await repo.close()
