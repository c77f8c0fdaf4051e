"""An Idempotency-Key whose holder is gone: a killed worker, a database down at release.

A claim is a lease its request renews while it runs. When the worker dies, or
cannot reach the database to release the key, the lease lapses within one
`IDEMPOTENCY_LEASE_SECONDS` and the owner's retry takes the key over, instead
of waiting for a lock sized to the request deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
from collections.abc import Callable

import asyncpg
import httpx
import pytest

from app.platform.config import DatabaseSettings
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.ops.servers import app_server
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"


async def key_row(url: str, key: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(
            "SELECT state, story_id FROM idempotency_keys WHERE owner = 'anonymous' AND key = $1",
            key,
        )
    finally:
        await conn.close()


async def stories_of_anonymous(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id FROM stories WHERE owner = 'anonymous'")
    finally:
        await conn.close()
    return [str(row["id"]) for row in rows]


async def test_a_key_the_database_could_not_release_is_free_after_one_lease(
    postgres_proxy: tuple[FaultProxy, str], clean_postgres: str, fake_openai: FakeOpenAI
) -> None:
    proxy, url = postgres_proxy
    settings = make_settings(
        database_url=url, openai_base_url=fake_openai.openai_base_url, idempotency_lease_seconds=2
    )
    settings.database = DatabaseSettings(
        _env_file=None,
        url=url,
        pool_min_size=1,
        pool_max_size=4,
        command_timeout_seconds=0.5,
        connect_timeout_seconds=0.5,
    )
    fake_openai.fail_next(Fault.delay(1.0), path=COMPLETIONS)
    headers = {"Idempotency-Key": "db-down-at-release"}
    async with serve(settings) as client:
        first = asyncio.create_task(client.post("/v1/stories", json=STORY_BODY, headers=headers))
        await fake_openai.wait_for_count(1, path=COMPLETIONS)
        # The database goes away while the upstream writes: the story cannot be
        # stored, and the key cannot be released.
        proxy.set_mode("down")
        failed = await first
        left_behind = await key_row(clean_postgres, "db-down-at-release")
        proxy.set_mode("pass")
        started = time.perf_counter()
        retry = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        took = time.perf_counter() - started

    print(f"\nretry after a release the database missed: {retry.status_code} in {took:.2f} s")
    assert failed.status_code == 503
    assert left_behind is not None
    assert left_behind["state"] == "pending"
    # Not a 409 after IDEMPOTENCY_WAIT_SECONDS: the claim lapsed within the wait.
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert fake_openai.count(path=COMPLETIONS) == 2
    assert await stories_of_anonymous(clean_postgres) == [retry.json()["id"]]


def post(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/stories", json=STORY_BODY, headers={"Idempotency-Key": key}, timeout=30
    )


def wait_until_upstream_called(
    fake: FakeOpenAI,
    request: concurrent.futures.Future[httpx.Response],
    server_output: Callable[[], str],
    within: float = 30.0,
) -> None:
    """Returns once the request is at the fake OpenAI; fails, saying why, if it never gets there."""
    give_up = time.monotonic() + within
    while fake.count(path=COMPLETIONS) < 1:
        if request.done():
            answer = request.result()
            pytest.fail(
                f"answered {answer.status_code} without calling OpenAI: {answer.text}\n"
                f"{server_output()}"
            )
        if time.monotonic() > give_up:
            pytest.fail(f"the request did not reach OpenAI within {within} s\n{server_output()}")
        time.sleep(0.01)


def test_a_retry_after_a_killed_worker_gets_the_story_from_a_fresh_process(
    fake_openai: FakeOpenAI, clean_postgres: str
) -> None:
    fake_openai.set_fault(Fault.delay(2.0), path=COMPLETIONS)
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "DATABASE_URL": clean_postgres,
        "RATE_LIMIT_CREATE_STORY": "10000/minute",
    }
    key = "killed-mid-request"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with app_server(env) as doomed:
            first = pool.submit(post, doomed.url, key)
            wait_until_upstream_called(fake_openai, first, doomed.output)
            time.sleep(0.5)  # mid-request: the upstream is still writing
            os.killpg(doomed.process.pid, signal.SIGKILL)
            doomed.process.wait(timeout=10)
        with pytest.raises(httpx.HTTPError):
            first.result(timeout=30)
    orphan = asyncio.run(key_row(clean_postgres, key))
    calls_before_retry = fake_openai.count(path=COMPLETIONS)

    with app_server(env) as fresh:
        started = time.perf_counter()
        retry = post(fresh.url, key)
        took = time.perf_counter() - started

    print(f"\nretry after a killed worker: {retry.status_code} in {took:.2f} s")
    assert orphan is not None
    assert orphan["state"] == "pending"
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert fake_openai.count(path=COMPLETIONS) - calls_before_retry == 1
    story_id = retry.json()["id"]
    assert asyncio.run(stories_of_anonymous(clean_postgres)) == [story_id]
    done = asyncio.run(key_row(clean_postgres, key))
    assert done is not None
    assert (done["state"], str(done["story_id"])) == ("done", story_id)
