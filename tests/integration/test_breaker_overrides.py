"""Operators' breaker overrides: `python -m app.breakers` acts on every replica through Redis.

Two app instances share one Redis and one fake OpenAI. The command (a
subprocess, as an operator runs it) forces `openai:chat` open: both instances
stop calling OpenAI and serve from the next rung, and `/health` says who forced
it and why. Forced closed, a failing OpenAI is called every time and the breaker
never opens. `reset` closes a breaker that failures opened. The store wrapper is
also tested alone on the in-process store, with a clock.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.core.resilience import CircuitBreaker, CircuitOpenError
from app.core.resilience.observer import BreakerState
from app.core.resilience.overrides import (
    OVERRIDES_KEY,
    BreakerOverrides,
    Override,
    OverridingBreakerStore,
)
from app.core.resilience.stores import InMemoryBreakerStore
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.ops.apps import ops_settings, running
from tests.support import STORY_BODY, run_python

COMPLETIONS = "/v1/chat/completions"


def breakers(redis_url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {} if redis_url is None else {"REDIS_URL": redis_url}
    return run_python(["-m", "app.breakers", *args], env)


def breaker_check(health: Mapping[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in health["checks"]["circuitBreaker:state"] if c["componentId"] == name]
    return dict(found)


async def until_check(
    client: httpx.AsyncClient, name: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Polls /health until the breaker's check satisfies `done` (the sync is every second)."""
    async with asyncio.timeout(15):
        while True:
            check = breaker_check((await client.get("/health")).json(), name)
            if done(check):
                return check
            await asyncio.sleep(0.1)


async def until_health(client: httpx.AsyncClient, name: str, wanted: str) -> dict[str, Any]:
    return await until_check(client, name, lambda check: wanted in (check.get("output") or ""))


def unforced(check: dict[str, Any]) -> bool:
    return not check.get("output")


# --- the store wrapper alone --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_forced_open_refuses_without_counting_and_ends_by_itself() -> None:
    clock = Clock()
    overrides = BreakerOverrides(clock)
    breaker = CircuitBreaker("b", OverridingBreakerStore(InMemoryBreakerStore(), overrides))
    overrides.replace_all({"b": Override(BreakerState.OPEN, clock.now + 60, "test")})

    with pytest.raises(CircuitOpenError) as refused:
        await breaker.acquire()
    assert 59 <= refused.value.retry_after <= 60
    snapshot = await breaker.snapshot()
    assert snapshot.state is BreakerState.OPEN
    assert snapshot.forced is not None
    assert "test" in snapshot.forced

    clock.now += 61  # expired: the breaker's own (closed) state again
    permit = await breaker.acquire()
    await breaker.record_success(permit)
    assert (await breaker.snapshot()).forced is None


async def test_forced_closed_admits_and_never_counts_failures() -> None:
    clock = Clock()
    overrides = BreakerOverrides(clock)
    breaker = CircuitBreaker(
        "b", OverridingBreakerStore(InMemoryBreakerStore(), overrides), failure_threshold=2
    )
    overrides.replace_all({"b": Override(BreakerState.CLOSED, clock.now + 60)})
    for _ in range(5):
        await breaker.record_failure(await breaker.acquire())

    clock.now += 61
    assert (await breaker.snapshot()).consecutive_failures == 0  # nothing was counted


def test_malformed_entries_override_nothing() -> None:
    assert Override.decode("not json") is None
    assert Override.decode('{"state": "half_open", "until": 1}') is None
    assert Override.decode('{"state": "open"}') is None


# --- the command, on two instances sharing Redis -------------------------------------


@pytest.mark.redis
async def test_forcing_open_reaches_every_instance_and_clear_ends_it(
    tmp_path: Path, redis_url: str, redis_client: Redis, fake_openai: FakeOpenAI
) -> None:
    settings = ops_settings(
        tmp_path, redis_url=redis_url, openai_base_url=fake_openai.openai_base_url
    )
    async with running(settings) as (_, one), running(settings) as (_, two):
        forced = breakers(redis_url, "open", "openai:chat", "--for", "10m", "--reason", "INC-42")
        assert forced.returncode == 0, forced.stderr
        checks = [await until_health(c, "openai:chat", "INC-42") for c in (one, two)]
        before = fake_openai.count(path=COMPLETIONS)
        stories = [(await c.post("/v1/stories", json=STORY_BODY)).json() for c in (one, two)]
        called_while_forced = fake_openai.count(path=COMPLETIONS) - before
        status = breakers(redis_url, "status")

        cleared = breakers(redis_url, "clear", "openai:chat")
        for client in (one, two):
            await until_check(client, "openai:chat", unforced)
        after = (await one.post("/v1/stories", json=STORY_BODY)).json()

    assert [c["observedValue"] for c in checks] == ["open", "open"]
    assert called_while_forced == 0
    assert all(s["provider"] != "openai" and s["degraded"] for s in stories)
    assert "openai:chat\topen" in status.stdout
    assert "INC-42" in status.stdout
    assert cleared.returncode == 0
    assert after["provider"] == "openai"
    assert await redis_client.hlen(OVERRIDES_KEY) == 0


@pytest.mark.redis
async def test_forced_closed_keeps_calling_a_failing_upstream_and_reset_closes(
    tmp_path: Path, redis_url: str, redis_client: Redis, fake_openai: FakeOpenAI
) -> None:
    settings = ops_settings(
        tmp_path, redis_url=redis_url, openai_base_url=fake_openai.openai_base_url
    )
    settings.resilience = settings.resilience.model_copy(
        update={"retry_max_retries": 0, "breaker_failure_threshold": 2}
    )
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    async with running(settings) as (_, client):
        assert breakers(redis_url, "close", "openai:chat", "--for", "5m").returncode == 0
        await until_health(client, "openai:chat", "forced closed")
        before = fake_openai.count(path=COMPLETIONS)
        for _ in range(4):
            await client.post("/v1/stories", json=STORY_BODY)
        called_while_forced_closed = fake_openai.count(path=COMPLETIONS) - before

        # Without the override, two failures open it; reset closes it again.
        assert breakers(redis_url, "clear", "openai:chat").returncode == 0
        await until_check(client, "openai:chat", unforced)
        for _ in range(3):
            await client.post("/v1/stories", json=STORY_BODY)
        # /health caches its checks for a moment: poll until it shows the change.
        opened = await until_check(client, "openai:chat", lambda c: c["observedValue"] == "open")
        reset = breakers(redis_url, "reset", "openai:chat")
        closed = await until_check(client, "openai:chat", lambda c: c["observedValue"] == "closed")

    assert called_while_forced_closed == 4  # every request called it; never opened
    assert opened["observedValue"] == "open"
    assert reset.returncode == 0, reset.stderr
    assert closed["observedValue"] == "closed"


def test_without_redis_the_command_explains_and_refuses() -> None:
    done = breakers(None, "status")

    assert done.returncode == 2
    assert "REDIS_URL is not set" in done.stderr


def test_an_override_must_end() -> None:
    done = breakers("redis://127.0.0.1:1/0", "open", "openai:chat", "--for", "3d")

    assert done.returncode == 2
    assert "duration" in done.stderr
