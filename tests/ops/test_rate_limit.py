"""Rate limiting over HTTP: per client and route, 429 problems, headers, Redis and its outages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Request
from limits import parse, parse_many
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.crc import key_slot

from app.core.ratelimit import (
    FailoverCounters,
    InProcessCounters,
    RedisCounters,
    WindowResult,
    limiter,
)
from app.core.resilience.testing import FakeClock
from app.dependencies import RateLimitedRoute
from app.main import create_app
from app.platform.config import RateLimitSettings, RedisSettings
from app.platform.redis import RedisGate
from tests.fakes.fault_proxy import FaultProxy
from tests.ops.apps import app_state, ops_settings, running
from tests.support import STORY_BODY


def limits(**values: Any) -> RateLimitSettings:
    return RateLimitSettings(_env_file=None, **values)


def assert_rate_limited(response: httpx.Response, limit: int) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-limit"] == str(limit)
    assert response.headers["x-ratelimit-remaining"] == "0"
    body: dict[str, Any] = response.json()
    assert body["status"] == 429
    assert body["type"].endswith("/rate-limited")
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_requests_over_the_default_limit_get_a_429_problem(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(default="3/minute"))
    async with running(settings) as (_, client):
        responses = [await client.get("/v1/stories") for _ in range(4)]

    assert [r.status_code for r in responses[:3]] == [200, 200, 200]
    body = assert_rate_limited(responses[3], 3)
    assert "3 requests per minute" in body["detail"]


async def test_a_client_has_one_budget_across_the_api_beneath_the_route_limits(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(per_client="3/minute"))
    async with running(settings) as (_, client):
        responses = [
            await client.get("/v1/stories"),
            await client.get("/v1/recommendations", params={"age": 6}),
            await client.get("/v1/stories"),
            await client.get("/v1/recommendations", params={"age": 6}),
        ]
        other_client = await client.get("/v1/stories", headers={"X-Forwarded-For": "x"})

    # Each route's own limit (100/minute) is far off: the fourth request of this
    # client, on any route, is over its 3 requests per minute across the API.
    assert [r.status_code for r in responses[:3]] == [200, 200, 200]
    body = assert_rate_limited(responses[3], 3)
    assert "across the API" in body["detail"]
    # The same address (a forwarding header from an untrusted peer changes nothing).
    assert other_client.status_code == 429


async def test_a_route_limit_tighter_than_the_client_budget_names_the_endpoint(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(per_client="50/minute", default="2/minute"))
    async with running(settings) as (_, client):
        responses = [await client.get("/v1/stories") for _ in range(3)]
        elsewhere = await client.get("/v1/recommendations", params={"age": 6})

    body = assert_rate_limited(responses[2], 2)
    assert "to this endpoint" in body["detail"]
    assert elsewhere.status_code == 200


async def test_allowed_responses_carry_limit_remaining_and_reset(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(default="3/minute"))
    async with running(settings) as (_, client):
        before = time.time()
        responses = [await client.get("/v1/stories") for _ in range(3)]
        after = time.time()

    assert [r.headers["x-ratelimit-limit"] for r in responses] == ["3", "3", "3"]
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["2", "1", "0"]
    reset = int(responses[0].headers["x-ratelimit-reset"])
    # A minute after the first hit, rounded up to whole seconds: bounded by the
    # clock read around the requests, not by how long they took on a busy machine.
    assert before < reset <= after + 61
    assert "retry-after" not in responses[0].headers


async def test_story_creation_has_its_own_tighter_limit(tmp_path: Path) -> None:
    settings = ops_settings(
        tmp_path, rate_limit=limits(default="10/minute", create_story="2/minute")
    )
    async with running(settings) as (_, client):
        created = [await client.post("/v1/stories", json=STORY_BODY) for _ in range(3)]
        listed = await client.get("/v1/stories")

    assert [r.status_code for r in created[:2]] == [201, 201]
    assert_rate_limited(created[2], 2)
    assert listed.status_code == 200
    assert listed.headers["x-ratelimit-limit"] == "10"


async def test_a_limited_clients_malformed_body_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    # FastAPI parses the body before any dependency: the limit was checked after,
    # so a limited client's malformed JSON was a 422 (and its body was parsed).
    settings = ops_settings(tmp_path, rate_limit=limits(create_story="1/minute"))
    headers = {"content-type": "application/json"}
    async with running(settings) as (_, client):
        first = await client.post("/v1/stories", content=b"{not json", headers=headers)
        second = await client.post("/v1/stories", content=b"{not json", headers=headers)
        invalid = await client.post("/v1/stories", json={"prompt": ""})

    assert first.status_code in {400, 422}  # within the limit: the body's own error
    assert_rate_limited(second, 1)
    assert_rate_limited(invalid, 1)


async def test_a_route_template_is_one_bucket_whatever_the_path_parameters(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(default="2/minute"))
    async with running(settings) as (_, client):
        statuses = [
            (await client.get(f"/v1/stories/6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e7{n}")).status_code
            for n in range(3)
        ]

    assert statuses == [404, 404, 429]


async def test_routes_listed_in_settings_get_their_own_limit(tmp_path: Path) -> None:
    settings = ops_settings(
        tmp_path,
        rate_limit=limits(default="10/minute", routes={"GET /v1/recommendations": "1/minute"}),
    )
    async with running(settings) as (_, client):
        first = await client.get("/v1/recommendations", params={"age": 6})
        second = await client.get("/v1/recommendations", params={"age": 6})

    assert first.status_code == 200
    assert_rate_limited(second, 1)


async def test_health_probes_and_metrics_are_never_limited(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(default="1/minute"))
    async with running(settings) as (_, client):
        statuses = {
            path: [(await client.get(path)).status_code for _ in range(5)]
            for path in ("/health/live", "/health/ready", "/health", "/metrics")
        }

    assert all(code != 429 for codes in statuses.values() for code in codes), statuses


async def test_a_disabled_limiter_neither_counts_nor_adds_headers(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(enabled=False, default="1/minute"))
    async with running(settings) as (_, client):
        responses = [await client.get("/v1/stories") for _ in range(3)]

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert "x-ratelimit-limit" not in responses[0].headers


decorated = APIRouter(route_class=RateLimitedRoute)


@decorated.get("/v1/decorated")
@limiter.limit("2/minute")
async def decorated_endpoint(request: Request) -> dict[str, bool]:
    return {"ok": True}


async def test_slowapi_decorator_limits_are_enforced_without_slowapis_sync_check(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path, rate_limit=limits(default="10/minute"))
    app = create_app(settings)
    app.include_router(decorated)
    async with running(settings, app=app) as (_, client):
        responses = [await client.get("/v1/decorated") for _ in range(3)]

    assert [r.status_code for r in responses[:2]] == [200, 200]
    assert_rate_limited(responses[2], 2)


@pytest.mark.redis
async def test_with_redis_two_app_instances_share_one_count(
    tmp_path: Path, redis_url: str, redis_client: Redis
) -> None:
    settings = ops_settings(tmp_path, redis_url=redis_url, rate_limit=limits(default="4/minute"))
    async with running(settings) as (_, one), running(settings) as (_, two):
        statuses = [(await (one, two)[n % 2].get("/v1/stories")).status_code for n in range(6)]

    assert statuses == [200, 200, 200, 200, 429, 429]


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["blackhole", "down"])
async def test_a_failing_redis_moves_counting_into_the_process_without_errors(
    tmp_path: Path, fault_proxy_redis: FaultProxy, redis_client: Redis, mode: str
) -> None:
    settings = ops_settings(
        tmp_path,
        redis_url=fault_proxy_redis.url_for(),
        rate_limit=limits(default="3/minute", redis_budget_ms=50, redis_retry_seconds=60),
    )
    async with running(settings) as (_, client):
        fault_proxy_redis.set_mode(mode)
        statuses = [(await client.get("/v1/stories")).status_code for _ in range(4)]
        health = (await client.get("/health")).json()

    assert statuses == [200, 200, 200, 429]
    storage = health["checks"]["rateLimiter:storage"][0]
    assert storage["status"] == "warn"
    assert storage["observedValue"] == "in-process"


@pytest.mark.redis
async def test_unrelated_requests_are_served_while_the_limiter_waits_on_a_slow_redis(
    tmp_path: Path, fault_proxy_redis: FaultProxy, redis_client: Redis
) -> None:
    # A budget far above Redis's delay: the limited request really waits on Redis.
    settings = ops_settings(
        tmp_path,
        redis_url=fault_proxy_redis.url_for(),
        rate_limit=limits(default="100/minute", redis_budget_ms=5000),
    )
    settings.redis = RedisSettings(
        _env_file=None, url=fault_proxy_redis.url_for(), socket_timeout_ms=5000
    )
    async with running(settings) as (_, client):
        fault_proxy_redis.latency_ms = 400
        fault_proxy_redis.set_mode("latency")
        limited = asyncio.ensure_future(client.get("/v1/stories"))
        await asyncio.sleep(0.05)  # the limited request is now waiting on Redis
        live = asyncio.ensure_future(client.get("/health/live"))
        done, _ = await asyncio.wait({limited, live}, return_when=asyncio.FIRST_COMPLETED)
        first_done = live in done
        results = await asyncio.gather(limited, live)

    assert first_done, "the liveness probe waited behind the rate limiter's Redis call"
    assert [r.status_code for r in results] == [200, 200]


# --- the counters themselves -----------------------------------------------------------------


class ScriptedRedisCounters:
    """Stands in for RedisCounters: fails while `failing`, counts its calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    async def hit(self, items: Any, client: str, scope: str) -> list[WindowResult]:
        self.calls += 1
        if self.failing:
            raise ConnectionError("redis is down")
        return [WindowResult(item, True, item.amount - 1, time.time() + 60) for item in items]


ITEMS = [parse("5/minute")]


async def test_after_a_redis_failure_counting_stays_in_process_until_the_retry_time() -> None:
    redis, clock = ScriptedRedisCounters(), FakeClock()
    counters = FailoverCounters(redis, InProcessCounters(), retry_seconds=5, clock=clock)  # type: ignore[arg-type]

    await counters.hit(ITEMS, "ip:1", "GET /x")
    clock.advance(4.9)
    await counters.hit(ITEMS, "ip:1", "GET /x")

    assert redis.calls == 1
    assert counters.degraded


async def test_after_the_retry_time_redis_is_tried_again_and_shared_counting_resumes() -> None:
    redis, clock = ScriptedRedisCounters(), FakeClock()
    counters = FailoverCounters(redis, InProcessCounters(), retry_seconds=5, clock=clock)  # type: ignore[arg-type]
    await counters.hit(ITEMS, "ip:1", "GET /x")

    redis.failing = False
    clock.advance(5)
    await counters.hit(ITEMS, "ip:1", "GET /x")

    assert redis.calls == 2
    assert counters.shared
    assert not counters.degraded


def storage_degraded_gauge() -> float:
    return REGISTRY.get_sample_value("story_rate_limit_storage_degraded") or 0.0


async def test_while_the_redis_gate_is_closed_the_limiter_reports_itself_degraded() -> None:
    clock = FakeClock()
    gate = RedisGate(cool_down_seconds=1.0, clock=clock)
    redis = ScriptedRedisCounters()
    redis.failing = False
    counters = FailoverCounters(
        redis,  # type: ignore[arg-type]
        InProcessCounters(),
        retry_seconds=5,
        clock=clock,
        gate=gate,
    )
    await counters.hit(ITEMS, "ip:1", "GET /x")
    assert counters.shared
    assert storage_degraded_gauge() == 0

    gate.report_failure()  # the breaker store or the cache saw Redis fail
    await counters.hit(ITEMS, "ip:1", "GET /x")

    assert redis.calls == 1, "Redis was called through a closed gate"
    assert counters.degraded
    assert not counters.shared
    assert counters.last_error is not None
    assert storage_degraded_gauge() == 1


async def test_counting_locally_behind_the_gate_neither_closes_it_again_nor_delays_redis() -> None:
    clock = FakeClock()
    gate = RedisGate(cool_down_seconds=1.0, clock=clock)
    redis = ScriptedRedisCounters()
    redis.failing = False
    counters = FailoverCounters(
        redis,  # type: ignore[arg-type]
        InProcessCounters(),
        retry_seconds=5,
        clock=clock,
        gate=gate,
    )
    gate.report_failure()
    clock.advance(0.9)
    await counters.hit(ITEMS, "ip:1", "GET /x")  # behind the gate: local

    clock.advance(0.1)  # the gate reopens 1 s after the failure it was told of
    assert gate.is_open()
    await counters.hit(ITEMS, "ip:1", "GET /x")

    assert redis.calls == 1, "the first hit after the gate reopened did not try Redis"
    assert counters.shared
    assert not counters.degraded
    assert storage_degraded_gauge() == 0


async def test_in_process_counters_refuse_past_the_limit() -> None:
    counters = InProcessCounters()

    results = [(await counters.hit([parse("2/minute")], "ip:1", "GET /x"))[0] for _ in range(3)]

    assert [r.allowed for r in results] == [True, True, False]
    assert [r.remaining for r in results] == [1, 0, 0]


@pytest.mark.redis
async def test_redis_counters_count_and_expire_each_window_in_one_script(
    redis_client: Redis, redis_url: str
) -> None:
    client = Redis.from_url(redis_url)
    try:
        counters = RedisCounters(client)
        item = parse("2/minute")
        results = [(await counters.hit([item], "ip:1", "GET /x"))[0] for _ in range(3)]
        ttl = await redis_client.ttl(counters.key(item, "ip:1", "GET /x"))
    finally:
        await client.aclose()

    assert [r.allowed for r in results] == [True, True, False]
    assert [r.remaining for r in results] == [1, 0, 0]
    assert 0 < ttl <= 60
    assert time.time() < results[0].reset_at <= time.time() + 60


async def test_health_shows_the_limiter_in_process_while_the_redis_gate_is_closed(
    tmp_path: Path, redis_url: str, redis_client: Redis
) -> None:
    settings = ops_settings(tmp_path, redis_url=redis_url)
    async with running(settings) as (app, client):
        gate = app_state(app).redis_gate
        assert gate is not None
        gate.cool_down_seconds = 60  # stays closed for the rest of the test
        gate.report_failure()
        await client.get("/v1/stories")
        health = (await client.get("/health")).json()

    storage = health["checks"]["rateLimiter:storage"][0]
    assert storage["status"] == "warn"
    assert storage["observedValue"] == "in-process"


# --- Redis Cluster: every key of one script call in one hash slot ------------------------


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first `{` and the next `}`."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


@pytest.mark.parametrize(
    ("client", "scope"),
    [
        ("ip:203.0.113.7", "POST /v1/stories"),
        ("ip:2001:db8:1:2::/64", "GET /v1/stories/{story_id}"),
        ("user:}{odd}", "GET /v1/stories/{story_id}"),
    ],
)
def test_the_keys_of_a_multi_limit_route_share_one_hash_tag_and_slot(
    client: str, scope: str
) -> None:
    counters = RedisCounters(Redis())  # no connection is made to build keys
    items = parse_many("20/minute;200/hour;1000/day")

    keys = [counters.key(item, client, scope) for item in items]

    assert len(set(keys)) == 3
    tags = {hash_tag(key) for key in keys}
    assert len(tags) == 1
    assert tags.pop(), "an empty hash tag makes Redis hash the whole key"
    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_a_clients_route_and_api_wide_keys_share_one_slot() -> None:
    counters = RedisCounters(Redis())
    item = parse("20/minute")

    route = counters.key(item, "ip:203.0.113.7", "POST /v1/stories")
    api = counters.key(item, "ip:203.0.113.7", "*")

    assert route != api
    assert key_slot(route.encode()) == key_slot(api.encode())


@pytest.mark.redis
async def test_route_and_api_wide_limits_count_in_one_script_call(
    redis_client: Redis, redis_url: str
) -> None:
    client = Redis.from_url(redis_url)
    try:
        counters = RedisCounters(client)
        items = [parse("5/minute"), parse("2/minute")]
        first = await counters.hit(items, "ip:1", ["GET /x", "*"])
        elsewhere = await counters.hit(items, "ip:1", ["GET /y", "*"])
        third = await counters.hit(items, "ip:1", ["GET /z", "*"])
    finally:
        await client.aclose()

    # Each route counted apart, the API-wide window shared by all three.
    assert [r.remaining for r in first] == [4, 1]
    assert [r.remaining for r in elsewhere] == [4, 0]
    assert [r.allowed for r in third] == [True, False]


def test_different_clients_of_one_route_get_different_hash_tags() -> None:
    counters = RedisCounters(Redis())
    item = parse("20/minute")

    one = counters.key(item, "ip:203.0.113.7", "POST /v1/stories")
    other = counters.key(item, "ip:203.0.113.8", "POST /v1/stories")

    assert hash_tag(one) != hash_tag(other)


@pytest.mark.redis
async def test_a_multi_limit_route_counts_every_limit_in_redis(
    redis_client: Redis, redis_url: str
) -> None:
    client = Redis.from_url(redis_url)
    try:
        counters = RedisCounters(client)
        items = parse_many("2/minute;3/hour")
        results = [await counters.hit(items, "ip:1", "GET /x") for _ in range(3)]
    finally:
        await client.aclose()

    assert [[r.allowed for r in rs] for rs in results] == [
        [True, True],
        [True, True],
        [False, True],
    ]
