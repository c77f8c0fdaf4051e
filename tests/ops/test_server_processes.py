"""Proof against running servers (`python -m app`, real Redis): limits hold across
processes, spoofed headers buy nothing, and a Redis outage takes nothing down."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.fakes.fault_proxy import FaultProxy
from tests.ops.servers import app_server
from tests.support import STORY_BODY

pytestmark = pytest.mark.slow


def from_address(local_address: str) -> httpx.Client:
    """A client whose connections come from `local_address` (any 127.x.y.z is this host)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=local_address), timeout=10)


@pytest.mark.redis
def test_two_server_processes_on_one_redis_admit_exactly_the_limit(
    tmp_path: Path, redis_url: str, redis_client: Redis
) -> None:
    common = {"REDIS_URL": redis_url, "RATE_LIMIT_DEFAULT": "5/minute"}
    with (
        app_server({**common, "DATABASE_SQLITE_PATH": str(tmp_path / "a.db")}) as one,
        app_server({**common, "DATABASE_SQLITE_PATH": str(tmp_path / "b.db")}) as two,
    ):
        statuses = [
            httpx.get(f"{(one, two)[n % 2].url}/v1/stories", timeout=10).status_code
            for n in range(12)
        ]

    assert statuses.count(200) == 5
    assert statuses.count(429) == 7
    assert statuses[:5] == [200] * 5


def test_a_spoofed_x_forwarded_for_from_an_untrusted_peer_does_not_change_the_key(
    tmp_path: Path,
) -> None:
    env = {
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "RATE_LIMIT_DEFAULT": "3/minute",
        "TRUSTED_PROXIES": "127.0.0.1",
    }
    with app_server(env) as server, from_address("127.0.0.2") as untrusted:
        statuses = [
            untrusted.get(
                f"{server.url}/v1/stories", headers={"X-Forwarded-For": f"198.51.100.{n}"}
            ).status_code
            for n in range(5)
        ]

    assert statuses == [200, 200, 200, 429, 429]


def test_without_trusted_proxies_a_loopback_caller_cannot_buy_quota_with_x_forwarded_for(
    tmp_path: Path,
) -> None:
    # Nothing is trusted: not even uvicorn may rewrite the client from the header.
    env = {
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "RATE_LIMIT_DEFAULT": "5/minute",
    }
    with app_server(env) as server, from_address("127.0.0.1") as caller:
        statuses = [
            caller.get(
                f"{server.url}/v1/stories", headers={"X-Forwarded-For": f"198.51.100.{n}"}
            ).status_code
            for n in range(7)
        ]

    assert statuses == [200] * 5 + [429, 429]


def test_a_trusted_proxy_forwarding_for_different_clients_gives_each_its_own_limit(
    tmp_path: Path,
) -> None:
    env = {
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "RATE_LIMIT_DEFAULT": "2/minute",
        "TRUSTED_PROXIES": "127.0.0.1",
    }
    with app_server(env) as server, from_address("127.0.0.1") as proxy:

        def as_client(address: str) -> int:
            response = proxy.get(f"{server.url}/v1/stories", headers={"X-Forwarded-For": address})
            return response.status_code

        first = [as_client("198.51.100.1") for _ in range(3)]
        second = as_client("198.51.100.2")

    assert first == [200, 200, 429]
    assert second == 200


@pytest.mark.redis
def test_redis_going_down_or_silent_mid_run_leaves_liveness_and_stories_up(
    tmp_path: Path, fault_proxy_redis: FaultProxy, redis_client: Redis
) -> None:
    env = {
        "REDIS_URL": fault_proxy_redis.url_for(),
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
    }
    observed: dict[str, list[int]] = {}
    with app_server(env) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        observed["pass"] = [client.post("/v1/stories", json=STORY_BODY).status_code]
        for mode in ("down", "blackhole"):
            fault_proxy_redis.set_mode(mode)
            observed[mode] = [
                client.get("/health/live").status_code,
                client.post("/v1/stories", json=STORY_BODY).status_code,
                client.post("/v1/stories", json=STORY_BODY).status_code,
                client.get("/v1/stories").status_code,
                client.get("/health/ready").status_code,
            ]
        fault_proxy_redis.set_mode("pass")
        observed["recovered"] = [client.get("/health/live").status_code]

    assert observed["pass"] == [201]
    # Readiness stays 200 (a warning): Redis is degradable and does not gate it by
    # default (HEALTH_REDIS_REQUIRED=false), so an outage keeps every pod in rotation.
    assert observed["down"] == [200, 201, 201, 200, 200]
    assert observed["blackhole"] == [200, 201, 201, 200, 200]
    assert observed["recovered"] == [200]
