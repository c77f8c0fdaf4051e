"""Several server processes on one Redis, and Redis itself failing under them.

Each server is a real `uvicorn app.main:app` child process, stopped by its PID.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve, uvicorn_process

COMPLETIONS = "/v1/chat/completions"

pytestmark = pytest.mark.slow


def server_env(
    fake_openai: FakeOpenAI, redis_url: str, tmp_path: Path, **extra: str
) -> dict[str, str]:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "REDIS_URL": redis_url,
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "RESILIENCE_RETRY_BASE_DELAY_SECONDS": "0.01",
        "RESILIENCE_RETRY_MAX_DELAY_SECONDS": "0.05",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_CREATE_STORY": "10000/minute",
        # These tests prove what is shared while Redis answers. On a loaded CI box
        # event-loop lag alone can outlast the 50 ms production budget and send a
        # call to in-process state (tested separately, with a fault proxy).
        "REDIS_SOCKET_TIMEOUT_MS": "500",
        "RATE_LIMIT_REDIS_BUDGET_MS": "500",
    }
    env.update(extra)
    return env


def post_story(url: str, **changes: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/stories", json={**STORY_BODY, **changes}, timeout=30)


def test_a_breaker_opened_in_one_process_rejects_in_the_other(
    fake_openai: FakeOpenAI, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    env = server_env(fake_openai, redis_url, tmp_path)
    with uvicorn_process(env) as one, uvicorn_process(env) as two:
        opened = post_story(one)
        attempts_in_one = fake_openai.count(path=COMPLETIONS)
        rejected = post_story(two, age=9)

    assert opened.json()["provider"] == "offline"
    assert attempts_in_one == 3
    assert rejected.status_code == 201
    assert rejected.json()["provider"] == "offline"
    assert fake_openai.count(path=COMPLETIONS) == 3


def test_half_open_lets_one_probe_through_across_both_processes(
    fake_openai: FakeOpenAI, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    env = server_env(
        fake_openai,
        redis_url,
        tmp_path,
        RESILIENCE_BREAKER_RECOVERY_SECONDS="1",
        RESILIENCE_BREAKER_HALF_OPEN_MAX_CALLS="1",
    )
    with uvicorn_process(env) as one, uvicorn_process(env) as two:
        post_story(one)  # three failures: open for 1 s
        assert fake_openai.count(path=COMPLETIONS) == 3
        time.sleep(1.2)
        # The probe is slow, so every other request arrives while it is in flight.
        fake_openai.set_fault(Fault.delay(1.0), path=COMPLETIONS)
        urls = [one, two] * 4
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
            responses = list(pool.map(lambda u: post_story(u), urls))
        after_probe = post_story(two, age=10)

    providers = [r.json()["provider"] for r in responses]
    assert all(r.status_code == 201 for r in responses)
    assert providers.count("openai") == 1
    assert providers.count("offline") == len(urls) - 1
    # 3 failures + exactly 1 probe + the request after the probe closed the breaker.
    assert fake_openai.count(path=COMPLETIONS) == 5
    assert after_probe.json()["provider"] == "openai"


@pytest.mark.parametrize("mode", ["blackhole", "down", "reset"])
async def test_requests_are_served_while_redis_is_gone_and_state_is_shared_again_after(
    fake_openai: FakeOpenAI,
    fault_proxy_redis: FaultProxy,
    redis_client: Any,
    tmp_path: Path,
    mode: str,
) -> None:
    proxied = fault_proxy_redis.url_for()
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        redis_url=proxied,
    )
    peer = make_settings(
        sqlite_path=tmp_path / "p.db",
        openai_base_url=fake_openai.openai_base_url,
        redis_url=proxied,
    )
    async with serve(settings) as client, serve(peer) as peer_client:
        healthy = await client.post("/v1/stories", json=STORY_BODY)
        fault_proxy_redis.set_mode(mode)
        during = [
            await client.post("/v1/stories", json={**STORY_BODY, "age": a}) for a in (3, 4, 5)
        ]
        live = await client.get("/health/live")
        fault_proxy_redis.set_mode("pass")
        await asyncio.sleep(1.1)  # the failover store retries Redis after its 1 s cool-down
        # Now open the breaker through one app; the other must see it through Redis.
        fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
        await client.post("/v1/stories", json={**STORY_BODY, "age": 11})
        calls_when_opened = fake_openai.count(path=COMPLETIONS)
        from_peer = await peer_client.post("/v1/stories", json={**STORY_BODY, "age": 12})

    assert healthy.json()["provider"] == "openai"
    assert [r.status_code for r in during] == [201, 201, 201]
    assert [r.json()["provider"] for r in during] == ["openai"] * 3
    assert live.status_code == 200
    assert from_peer.json()["provider"] == "offline"
    assert fake_openai.count(path=COMPLETIONS) == calls_when_opened


async def test_a_silent_redis_costs_a_request_one_budget_not_one_per_component(
    fake_openai: FakeOpenAI,
    fault_proxy_redis: FaultProxy,
    redis_client: Any,
    tmp_path: Path,
) -> None:
    from app.platform.metrics import (
        BREAKER_STORE_FALLBACKS,
        RATE_LIMIT_STORAGE_FALLBACKS,
    )

    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        redis_url=fault_proxy_redis.url_for(),
    )
    async with serve(settings) as client:
        await client.post("/v1/stories", json=STORY_BODY)  # connections are warm
        limiter_before = RATE_LIMIT_STORAGE_FALLBACKS._value.get()
        breaker_before = BREAKER_STORE_FALLBACKS._value.get()
        fault_proxy_redis.set_mode("blackhole")
        response = await client.post("/v1/stories", json={**STORY_BODY, "age": 4})
        limiter_waits = RATE_LIMIT_STORAGE_FALLBACKS._value.get() - limiter_before
        breaker_waits = BREAKER_STORE_FALLBACKS._value.get() - breaker_before
        fault_proxy_redis.set_mode("pass")

    assert response.status_code == 201
    assert response.json()["provider"] == "openai"
    # The limiter ran first, spent the Redis budget and closed the gate; the
    # breaker store then went straight to its in-process state.
    assert limiter_waits == 1
    assert breaker_waits == 0
