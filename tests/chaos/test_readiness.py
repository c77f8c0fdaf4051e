"""Readiness tells the truth about Redis: slow is not down, silent is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.platform.config import HealthSettings
from tests.fakes.fault_proxy import FaultProxy
from tests.support import STORY_BODY, make_settings, serve


def _settings(tmp_path: Path, redis_url: str) -> Any:
    # No reuse of a previous round of checks: each probe below measures anew.
    return make_settings(
        sqlite_path=tmp_path / "s.db",
        redis_url=redis_url,
        # Redis gating readiness is an operator's choice (off by default): tested on.
        health=HealthSettings(_env_file=None, cache_seconds=0, redis_required=True),
    )


async def test_a_slow_but_answering_redis_keeps_the_instance_ready(
    fault_proxy_redis: FaultProxy, redis_client: Any, tmp_path: Path
) -> None:
    async with serve(_settings(tmp_path, fault_proxy_redis.url_for())) as client:
        warm = await client.get("/health/ready")  # probes keep their connection warm
        fault_proxy_redis.latency_ms = 100  # slower than the 50 ms request budget
        fault_proxy_redis.set_mode("latency")
        ready = await client.get("/health/ready")
        story = await client.post("/v1/stories", json=STORY_BODY)
        fault_proxy_redis.set_mode("pass")

    assert warm.status_code == 200
    assert ready.status_code == 200, ready.text
    assert story.status_code == 201


async def test_a_silent_redis_makes_the_instance_unready_naming_it(
    fault_proxy_redis: FaultProxy, redis_client: Any, tmp_path: Path
) -> None:
    async with serve(_settings(tmp_path, fault_proxy_redis.url_for())) as client:
        warm = await client.get("/health/ready")
        fault_proxy_redis.set_mode("blackhole")
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        fault_proxy_redis.set_mode("pass")

    assert warm.status_code == 200
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["redis"]
    assert live.status_code == 200
