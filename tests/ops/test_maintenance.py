"""Maintenance mode: API routes answer 503 with Retry-After; health and metrics stay up."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from app.platform.config import MaintenanceSettings
from tests.ops.apps import ops_settings, running
from tests.support import STORY_BODY


def maintenance(**values: object) -> MaintenanceSettings:
    return MaintenanceSettings(_env_file=None, **values)


async def test_the_setting_puts_api_routes_in_maintenance_with_retry_after(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path, maintenance=maintenance(mode=True, retry_after_seconds=120))
    async with running(settings) as (_, client):
        created = await client.post("/v1/stories", json=STORY_BODY)
        listed = await client.get("/v1/stories")

    for response in (created, listed):
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "120"
        assert response.json()["type"].endswith("/maintenance")
        assert response.json()["request_id"] == response.headers["x-request-id"]


async def test_health_and_metrics_stay_up_in_maintenance(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path, maintenance=maintenance(mode=True))
    async with running(settings) as (_, client):
        statuses = {
            path: (await client.get(path)).status_code
            for path in ("/health/live", "/health/ready", "/metrics")
        }
        health = (await client.get("/health")).json()

    assert statuses == {"/health/live": 200, "/health/ready": 200, "/metrics": 200}
    mode = health["checks"]["maintenance:mode"][0]
    assert mode["status"] == "warn"
    assert mode["observedValue"] is True


async def test_maintenance_answers_are_counted_apart_from_api_errors(tmp_path: Path) -> None:
    maintained = {"method": "GET", "route": "<maintenance>", "status": "503"}
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "503"}
    before = {
        "maintenance": REGISTRY.get_sample_value("story_http_requests_total", maintained) or 0,
        "unmatched": REGISTRY.get_sample_value("story_http_requests_total", unmatched) or 0,
    }
    settings = ops_settings(tmp_path, maintenance=maintenance(mode=True))
    async with running(settings) as (_, client):
        for _ in range(3):
            assert (await client.get("/v1/stories")).status_code == 503

    after = {
        "maintenance": REGISTRY.get_sample_value("story_http_requests_total", maintained) or 0,
        "unmatched": REGISTRY.get_sample_value("story_http_requests_total", unmatched) or 0,
    }
    assert after["maintenance"] == before["maintenance"] + 3
    assert after["unmatched"] == before["unmatched"]


async def settled_status(client: httpx.AsyncClient, expected: int) -> int:
    """GET /v1/stories until it answers `expected` (each instance re-reads the flag on
    its own schedule); gives up after a few seconds and returns the last status."""
    status = (await client.get("/v1/stories")).status_code
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while status != expected:
                await asyncio.sleep(0.02)
                status = (await client.get("/v1/stories")).status_code
    return status


@pytest.mark.redis
async def test_the_redis_flag_turns_maintenance_on_and_off_for_every_instance(
    tmp_path: Path, redis_url: str, redis_client: Redis
) -> None:
    settings = ops_settings(
        tmp_path, redis_url=redis_url, maintenance=maintenance(refresh_seconds=0.05)
    )
    async with running(settings) as (_, one), running(settings) as (_, two):
        before = [(await c.get("/v1/stories")).status_code for c in (one, two)]
        await redis_client.set("story:maintenance", "on")
        during = [await settled_status(c, 503) for c in (one, two)]
        await redis_client.delete("story:maintenance")
        after = [await settled_status(c, 200) for c in (one, two)]

    assert before == [200, 200]
    assert during == [503, 503]
    assert after == [200, 200]


@pytest.mark.redis
async def test_a_flag_set_before_start_is_obeyed_from_the_first_request(
    tmp_path: Path, redis_url: str, redis_client: Redis
) -> None:
    await redis_client.set("story:maintenance", "on")
    settings = ops_settings(tmp_path, redis_url=redis_url)
    async with running(settings) as (_, client):
        first = await client.get("/v1/stories")

    assert first.status_code == 503
