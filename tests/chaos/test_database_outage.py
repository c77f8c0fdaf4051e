"""PostgreSQL black-holed or down under a running app (a TCP fault proxy in front of it)."""

from __future__ import annotations

import pytest

from app.platform.config import DatabaseSettings
from tests.fakes.fault_proxy import FaultProxy
from tests.support import STORY_BODY, make_settings, serve


@pytest.mark.parametrize("mode", ["blackhole", "down"])
async def test_a_database_outage_is_a_503_that_changes_nothing_and_recovers(
    postgres_proxy: tuple[FaultProxy, str], mode: str
) -> None:
    proxy, url = postgres_proxy
    settings = make_settings(database_url=url)
    settings.database = DatabaseSettings(
        _env_file=None,
        url=url,
        pool_min_size=1,
        pool_max_size=2,
        command_timeout_seconds=0.5,
        connect_timeout_seconds=0.5,
    )
    async with serve(settings) as client:
        before = await client.post("/v1/stories", json=STORY_BODY)
        proxy.set_mode(mode)
        created = await client.post("/v1/stories", json={**STORY_BODY, "age": 9})
        fetched = await client.get(before.headers["location"])
        recommended = await client.get("/v1/recommendations", params={"age": 6})
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        proxy.set_mode("pass")
        after = await client.post("/v1/stories", json={**STORY_BODY, "age": 10})
        listed = (await client.get("/v1/stories")).json()

    assert before.status_code == 201
    assert created.status_code == 503
    assert created.headers["content-type"] == "application/problem+json"
    assert created.headers["retry-after"] == "5"
    assert fetched.status_code == 503
    assert recommended.status_code == 200
    assert recommended.json()["items"] == []
    assert ready.status_code == 503
    assert live.status_code == 200
    assert after.status_code == 201
    # The story refused during the outage was not half-stored.
    assert sorted(item["age"] for item in listed["items"]) == [6, 10]
