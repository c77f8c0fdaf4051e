"""Health endpoints: liveness touches nothing, readiness says whether this instance can
serve, /health reports everything in the IETF health-check format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from app.platform.config import HealthSettings, OpenAISettings
from tests.fakes.fault_proxy import FaultProxy
from tests.ops.apps import app_state, ops_settings, running
from tests.support import STORY_BODY

HEALTH_JSON = "application/health+json"


def check(body: dict[str, Any], key: str, component: str | None = None) -> dict[str, Any]:
    entries: list[dict[str, Any]] = body["checks"][key]
    found: dict[str, Any] = next(
        e for e in entries if component is None or e.get("componentId") == component
    )
    return found


async def test_liveness_answers_pass_in_health_json(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.get("/health/live")

    assert response.status_code == 200
    assert response.headers["content-type"] == HEALTH_JSON
    assert response.json() == {"status": "pass"}


async def test_readiness_passes_on_the_embedded_defaults(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.get("/health/ready")

    body = response.json()
    assert response.status_code == 200
    assert response.headers["content-type"] == HEALTH_JSON
    assert check(body, "database:responseTime")["status"] == "pass"
    assert check(body, "redis:responseTime")["componentId"] == "in-process"
    assert "failing" not in body


async def test_missing_provider_keys_are_readiness_warnings_not_failures(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.get("/health/ready")

    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "warn"
    assert check(body, "openai:credentials")["observedValue"] == "missing"
    assert any(w.startswith("openai:credentials") for w in body["warnings"])


async def test_readiness_fails_with_503_from_the_moment_the_app_drains(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (app, client):
        app_state(app).lifecycle.draining = True
        response = await client.get("/health/ready")
        live = await client.get("/health/live")

    assert response.status_code == 503
    assert response.json()["failing"] == ["lifecycle"]
    assert live.status_code == 200


async def test_readiness_fails_naming_the_database_when_a_migration_is_missing(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path)
    async with running(settings) as (_, client):
        async with aiosqlite.connect(settings.database.sqlite_path) as db:
            await db.execute("DELETE FROM schema_migrations WHERE version LIKE '0002%'")
            await db.commit()
        response = await client.get("/health/ready")

    body = response.json()
    assert response.status_code == 503
    assert body["failing"] == ["database"]
    assert "0002" in check(body, "database:responseTime")["output"]


async def test_an_open_circuit_breaker_is_a_warning_and_readiness_stays_200(
    tmp_path: Path,
) -> None:
    settings = ops_settings(tmp_path, openai_base_url="http://127.0.0.1:9/v1")
    async with running(settings) as (app, client):
        breaker = app_state(app).breakers["openai:chat"]
        for _ in range(breaker.config.failure_threshold):
            await breaker.record_failure(await breaker.acquire())
        ready = await client.get("/health/ready")
        health = await client.get("/health")

    assert ready.status_code == 200
    assert ready.json()["status"] == "warn"
    opened = check(health.json(), "circuitBreaker:state", "openai:chat")
    assert opened["observedValue"] == "open"
    assert opened["status"] == "warn"


async def test_health_reports_in_the_ietf_health_check_shape(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.get("/health")

    body = response.json()
    assert response.headers["content-type"] == HEALTH_JSON
    assert body["status"] in {"pass", "warn"}
    assert body["version"] == "0.1.0"
    assert body["serviceId"] == "story-service"
    for key in (
        "database:responseTime",
        "redis:responseTime",
        "openai:credentials",
        "replicate:credentials",
        "cpu:utilization",
        "memory:utilization",
        "disk:utilization",
        "process:residentMemory",
        "uptime",
    ):
        entry = check(body, key)
        assert {"componentType", "status", "time"} <= entry.keys(), key
    assert check(body, "database:responseTime")["observedUnit"] == "ms"
    assert check(body, "cpu:utilization")["observedUnit"] == "percent"
    assert check(body, "process:residentMemory")["observedValue"] > 0


async def test_health_says_a_key_is_configured_but_never_shows_it(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path)
    settings.openai = OpenAISettings(_env_file=None, api_key=SecretStr("sk-very-secret-123"))
    async with running(settings) as (_, client):
        response = await client.get("/health")

    assert check(response.json(), "openai:credentials")["observedValue"] == "configured"
    assert "sk-very-secret-123" not in response.text


async def test_system_figures_above_their_thresholds_warn(tmp_path: Path) -> None:
    settings = ops_settings(
        tmp_path, health=HealthSettings(_env_file=None, memory_warn_percent=0.01)
    )
    async with running(settings) as (_, client):
        response = await client.get("/health")

    memory = check(response.json(), "memory:utilization")
    assert memory["status"] == "warn"
    assert response.json()["status"] == "warn"


@pytest.mark.redis
async def test_with_redis_required_readiness_fails_naming_redis_when_it_is_down(
    tmp_path: Path, fault_proxy_redis: FaultProxy, redis_client: Redis
) -> None:
    settings = ops_settings(
        tmp_path,
        redis_url=fault_proxy_redis.url_for(),
        health=HealthSettings(_env_file=None, redis_required=True),
    )
    async with running(settings) as (_, client):
        fault_proxy_redis.set_mode("down")
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")

    assert ready.status_code == 503
    assert ready.json()["failing"] == ["redis"]
    assert live.status_code == 200


@pytest.mark.redis
async def test_by_default_a_redis_outage_is_a_readiness_warning_not_a_failure(
    tmp_path: Path, fault_proxy_redis: FaultProxy, redis_client: Redis
) -> None:
    settings = ops_settings(tmp_path, redis_url=fault_proxy_redis.url_for())
    async with running(settings) as (_, client):
        fault_proxy_redis.set_mode("down")
        ready = await client.get("/health/ready")
        story = await client.post("/v1/stories", json=STORY_BODY)

    assert ready.status_code == 200
    assert story.status_code == 201
    assert check(ready.json(), "redis:responseTime")["status"] == "warn"


@pytest.mark.redis
async def test_a_black_holed_redis_is_reported_as_failing_not_waited_for(
    tmp_path: Path, fault_proxy_redis: FaultProxy, redis_client: Redis
) -> None:
    # Redis's own socket timeout far above the health budget: only the budget ends the wait.
    settings = ops_settings(
        tmp_path,
        redis_url=fault_proxy_redis.url_for(),
        health=HealthSettings(_env_file=None, check_timeout_seconds=0.2, redis_required=True),
    )
    settings.redis = settings.redis.model_copy(update={"socket_timeout_ms": 30_000})
    async with running(settings) as (_, client):
        fault_proxy_redis.set_mode("blackhole")
        response = await client.get("/health")

    redis = check(response.json(), "redis:responseTime")
    assert response.status_code == 503
    assert redis["status"] == "fail"
    assert redis["output"] == "no answer within 0.2 s"
    assert check(response.json(), "database:responseTime")["status"] == "pass"
