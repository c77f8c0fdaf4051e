"""The upstream quota governor on a real Redis: one account's requests and tokens
per minute, spent by every process together; waits, refusals down the ladder, and
the in-process share when Redis is gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from app.core.resilience import (
    QuotaExhaustedError,
    QuotaGovernor,
    QuotaLimits,
    RedisBuckets,
    deadline_scope,
)
from app.core.resilience.testing import FakeClock
from app.platform.config import Settings
from app.platform.redis import RedisGate, open_redis
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"


class Events:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.refusals: list[str] = []
        self.storage_changes: list[tuple[bool, bool]] = []

    def waited(self, name: str, seconds: float) -> None:
        self.waits.append(seconds)

    def refused(self, name: str, reason: str) -> None:
        self.refusals.append(reason)

    def storage(self, name: str, degraded: bool, redis_error: bool) -> None:
        self.storage_changes.append((degraded, redis_error))


@pytest.fixture
async def redis_pair(
    redis_client: aioredis.Redis, redis_url: str
) -> AsyncIterator[list[aioredis.Redis]]:
    """Two clients of the test database, as two processes would hold (flushed by redis_client)."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


def governor(redis: aioredis.Redis | None, limits: QuotaLimits, **options: object) -> QuotaGovernor:
    return QuotaGovernor(
        "openai",
        limits,
        redis=RedisBuckets(redis) if redis is not None else None,
        budget_seconds=1.0,
        **options,  # type: ignore[arg-type]
    )


async def test_two_processes_spend_one_account(redis_pair: list[aioredis.Redis]) -> None:
    first, second = (governor(client, QuotaLimits(requests_per_minute=4)) for client in redis_pair)
    granted = 0
    refusals: list[str] = []
    with deadline_scope(5.0):
        for current in (first, second, first, second, first, second):
            try:
                await current.acquire(0)
                granted += 1
            except QuotaExhaustedError as error:
                refusals.append(error.reason)

    assert granted == 4  # the account's four, not four per process
    assert refusals == ["requests", "requests"]
    assert first.shared
    assert second.shared


async def test_a_call_waits_for_the_quota_to_refill_within_its_deadline(
    redis_pair: list[aioredis.Redis],
) -> None:
    events = Events()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    account = governor(
        redis_pair[0], QuotaLimits(requests_per_minute=60), events=events, sleep=sleep
    )
    with deadline_scope(10.0):
        for _ in range(60):
            await account.acquire(0)
        await account.acquire(0)  # the 61st: one second's refill away
        await account.acquire(0)  # the 62nd: queued behind it

    assert slept[0] == pytest.approx(1.0, abs=0.2)
    assert slept[1] > slept[0]  # reservations are served in order
    assert events.waits == slept
    assert events.refusals == []


async def test_tokens_are_estimated_before_and_corrected_after(
    redis_pair: list[aioredis.Redis],
) -> None:
    account = governor(redis_pair[0], QuotaLimits(tokens_per_minute=1000))
    with deadline_scope(2.0):
        reservation = await account.acquire(900)  # the request's maximum
        with pytest.raises(QuotaExhaustedError) as spent:
            await account.acquire(500)
        account.settle_soon(reservation, sent=True, used_tokens=150)  # what the reply used
        await account.settled()
        await account.acquire(500)  # the 750 given back make room

    assert spent.value.reason == "tokens"


async def test_a_call_that_never_reached_the_upstream_gives_its_reservation_back(
    redis_pair: list[aioredis.Redis],
) -> None:
    account = governor(redis_pair[0], QuotaLimits(requests_per_minute=1))
    with deadline_scope(2.0):
        reservation = await account.acquire(0)
        account.settle_soon(reservation, sent=False)
        await account.settled()
        await account.acquire(0)  # not refused: the first was never sent


async def test_redis_down_spends_this_process_share(
    fault_proxy_redis: FaultProxy, redis_client: aioredis.Redis
) -> None:
    fault_proxy_redis.set_mode("down")
    client = open_redis(
        fault_proxy_redis.url_for(),
        timeout_seconds=0.2,
        connect_timeout_seconds=0.2,
        max_connections=4,
    )
    events = Events()
    account = QuotaGovernor(
        "openai",
        QuotaLimits(requests_per_minute=20),
        redis=RedisBuckets(client),
        budget_seconds=0.2,
        retry_seconds=60.0,
        gate=RedisGate(),
        local_share=0.25,
        clock=FakeClock(),
        events=events,
    )
    granted = 0
    try:
        with deadline_scope(5.0):
            for _ in range(10):
                try:
                    await account.acquire(0)
                    granted += 1
                except QuotaExhaustedError:
                    pass
    finally:
        await client.aclose()

    assert granted == 5  # a quarter of the account's 20, counted in this process
    assert not account.shared
    assert events.storage_changes[0] == (True, True)


# --- through the API ------------------------------------------------------------------


def quota_settings(tmp_path: Path, name: str, fake: FakeOpenAI, redis_url: str) -> Settings:
    settings = make_settings(
        sqlite_path=tmp_path / f"{name}.db",
        openai_base_url=fake.openai_base_url,
        redis_url=redis_url,
        request_deadline_seconds=3.0,
    )
    settings.openai.requests_per_minute = 2
    return settings


def refusals(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "story_quota_refusals_total", {"provider": "openai", "reason": reason}
    )
    return value or 0.0


async def test_two_app_instances_share_the_quota_and_fall_back_with_the_reason(
    fake_openai: FakeOpenAI,
    redis_client: aioredis.Redis,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = refusals("requests")
    async with (
        serve(quota_settings(tmp_path, "a", fake_openai, redis_url)) as first,
        serve(quota_settings(tmp_path, "b", fake_openai, redis_url)) as second,
    ):
        answers = [
            await first.post("/v1/stories", json={**STORY_BODY, "age": 4}),
            await second.post("/v1/stories", json={**STORY_BODY, "age": 5}),
            await first.post("/v1/stories", json={**STORY_BODY, "age": 6}),
            await second.post("/v1/stories", json={**STORY_BODY, "age": 7}),
        ]

    providers = [answer.json()["provider"] for answer in answers]
    assert [answer.status_code for answer in answers] == [201] * 4
    assert providers[:2] == ["openai", "openai"]
    assert providers[2:] == ["offline", "offline"]  # no 429 earned: never sent
    assert fake_openai.count(path=COMPLETIONS) == 2
    assert refusals("requests") - before == 2
    assert "quota openai: requests per minute spent" in capsys.readouterr().out  # the app's log
