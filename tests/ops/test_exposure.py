"""What the service shows to whoever reaches its port: API docs, metrics, redirects,
header limits, and the host names its health report could leak."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from app.platform.config import AuthSettings, Settings
from app.services.health_checks import redact_addresses
from tests.fakes.fault_proxy import FaultProxy
from tests.ops.apps import ops_settings, running
from tests.support import STORY_BODY

DOC_PATHS = ("/docs", "/redoc", "/openapi.json")
TOKEN = "scrape-token-0123456789abcdef"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def production(**values: Any) -> Settings:
    """APP_ENV=production with the identity settings production insists on."""
    auth = AuthSettings(
        _env_file=None,
        jwks_url="https://id.example.test/.well-known/jwks.json",
        issuer="https://id.example.test/",
        audience="story-service",
    )
    return Settings(_env_file=None, app_env="production", auth=auth, **values)


# --- API docs ----------------------------------------------------------------------------


async def test_docs_are_served_in_test_and_development(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        answers = {path: await client.get(path) for path in DOC_PATHS}

    assert {path: r.status_code for path, r in answers.items()} == dict.fromkeys(DOC_PATHS, 200)
    assert "/v1/stories" in answers["/openapi.json"].json()["paths"]


async def test_docs_switched_off_are_404_problems(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path, docs_enabled=False)) as (_, client):
        answers = [await client.get(path) for path in (*DOC_PATHS, "/docs/oauth2-redirect")]

    for response in answers:
        assert_problem(response, 404)


def test_docs_default_to_off_in_production_only() -> None:
    assert Settings(_env_file=None, app_env="development").docs_enabled is True
    assert Settings(_env_file=None, app_env="test").docs_enabled is True
    assert production().docs_enabled is False
    assert production(docs_enabled=True).docs_enabled is True


def test_docs_enabled_from_the_environment_wins_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCS_ENABLED", "true")
    assert production().docs_enabled is True
    monkeypatch.setenv("DOCS_ENABLED", "")
    assert production().docs_enabled is False


# --- /metrics ----------------------------------------------------------------------------


async def test_metrics_without_a_token_configured_are_open(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.get("/metrics")

    assert response.status_code == 200
    assert "story_http_requests_total" in response.text


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x"],
)
async def test_metrics_with_a_token_refuse_anything_else_with_a_401_problem(
    tmp_path: Path, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with running(ops_settings(tmp_path, metrics_token=SecretStr(TOKEN))) as (_, client):
        response = await client.get("/metrics", headers=headers)

    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert "story_" not in response.text
    assert TOKEN not in json.dumps(body)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_metrics_with_the_token_are_served(tmp_path: Path, scheme: str) -> None:
    async with running(ops_settings(tmp_path, metrics_token=SecretStr(TOKEN))) as (_, client):
        response = await client.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})

    assert response.status_code == 200
    assert "story_http_requests_total" in response.text


def test_an_empty_metrics_token_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Secret's optional key left blank arrives as an empty variable: unset, not "".
    monkeypatch.setenv("METRICS_TOKEN", "")
    assert Settings(_env_file=None, app_env="test").metrics_token is None


async def test_an_empty_metrics_token_given_directly_leaves_metrics_open(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path, metrics_token=SecretStr(""))) as (_, client):
        response = await client.get("/metrics", headers={"Authorization": "Bearer "})

    assert response.status_code == 200


# --- no open redirect --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/stories/"), ("POST", "/v1/stories/"), ("GET", "/health/"), ("GET", "/metrics/")],
)
async def test_a_trailing_slash_is_a_404_never_a_redirect_to_the_host_named(
    tmp_path: Path, method: str, path: str
) -> None:
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.request(method, path, headers=forged, json=STORY_BODY)

    assert_problem(response, 404)
    assert "location" not in response.headers
    assert "evil.example" not in response.text


# --- header limits (the app's; the server's are in test_server_settings.py) --------------


async def test_too_many_headers_are_a_431_problem(tmp_path: Path) -> None:
    settings = ops_settings(tmp_path, max_header_count=20)
    many = {f"x-extra-{n}": "1" for n in range(25)}
    async with running(settings) as (_, client):
        refused = await client.get("/v1/stories", headers=many)
        accepted = await client.get("/v1/stories", headers=dict(list(many.items())[:10]))

    body = assert_problem(refused, 431)
    assert "at most 20" in body["detail"]
    assert refused.headers["connection"] == "close"
    assert accepted.status_code == 200


async def test_too_many_header_bytes_are_a_431_problem(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path, max_header_bytes=4096)) as (_, client):
        refused = await client.get("/health/live", headers={"x-big": "a" * 5000})
        accepted = await client.get("/health/live", headers={"x-big": "a" * 3000})

    body = assert_problem(refused, 431)
    assert "at most 4096" in body["detail"]
    assert accepted.status_code == 200


# --- /health names no host ---------------------------------------------------------------


def checks_of(body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = body["checks"][key]
    return found


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("Error 111 connecting to 10.0.3.7:6379. Connection refused.", "Connection refused."),
        ("Error -2 connecting to story-redis.internal:6379. Name or service not known.", ""),
        ("Connect call failed ('::1', 5432, 0, 0)", "Connect call failed"),
        ('could not translate host name "story-postgres" to address', "could not translate"),
        ("Error 111 connecting to [fd00::5]:6379.", "Error 111"),
        ("redis://:hunter2@story-redis:6379/0 refused", "refused"),
        ("no answer within 0.5 s", "no answer within 0.5 s"),
    ],
)
def test_addresses_are_redacted_from_check_outputs(raw: str, kept: str) -> None:
    redacted = redact_addresses(raw)

    for secret in ("10.0.3.7", "story-redis", "::1", "5432", "story-postgres", "fd00", "hunter2"):
        assert secret not in redacted
    assert kept in redacted


@pytest.mark.redis
@pytest.mark.postgres
async def test_health_with_its_dependencies_down_names_no_host(
    tmp_path: Path,
    fault_proxy_redis: FaultProxy,
    redis_client: Redis,
    redis_url: str,
    clean_postgres: str,
) -> None:
    db = urlsplit(clean_postgres)
    pg_proxy = FaultProxy(db.hostname or "127.0.0.1", db.port or 5432)
    pg_proxy.start()
    try:
        settings = ops_settings(
            tmp_path,
            redis_url=fault_proxy_redis.url_for(path=urlsplit(redis_url).path),
            database_url=f"postgresql://{db.username}@{pg_proxy.host}:{pg_proxy.port}{db.path}",
        )
        async with running(settings) as (_, client):
            fault_proxy_redis.set_mode("down")
            pg_proxy.set_mode("down")
            response = await client.get("/health")
    finally:
        pg_proxy.stop()

    body = response.json()
    assert response.status_code == 503
    text = json.dumps(body)
    for port in (pg_proxy.port, fault_proxy_redis.port):
        assert str(port) not in text
    assert "127.0.0.1" not in text
    database = checks_of(body, "database:responseTime")[0]
    redis = checks_of(body, "redis:responseTime")[0]
    assert database["status"] == "fail"
    assert redis["status"] == "warn"  # degradable: it does not gate readiness by default
    assert "<address>" in database["output"] + redis["output"]
    # Names of parts ("postgres", "redis", "openai:chat"), never where they live.
    component_ids = {
        c["componentId"] for cs in body["checks"].values() for c in cs if "componentId" in c
    }
    assert {"postgres", "redis"} <= component_ids
    assert all(re.fullmatch(r"[a-z-]+(:[a-z-]+)?", cid) for cid in component_ids), component_ids
