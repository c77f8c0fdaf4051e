"""A history check: a run of requests through an upstream and Redis outage, then an audit.

Every request is accounted for (answered 201 and stored exactly once), upstream
attempts stay within what the retry policy and budget allow, and liveness never
fails while things break underneath.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from app.platform.config import ResilienceSettings
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"
PER_PHASE = 20
CONCURRENCY = 5


async def _phase(client: httpx.AsyncClient, start: int, log: list[httpx.Response]) -> list[int]:
    """PER_PHASE story requests, CONCURRENCY at a time, with a liveness probe per wave."""
    live_statuses: list[int] = []
    for wave in range(start, start + PER_PHASE, CONCURRENCY):
        stories = [
            client.post(
                "/v1/stories",
                json={**STORY_BODY, "prompt": f"story number {n}"},
                headers={"Idempotency-Key": f"history-{n}"},
            )
            for n in range(wave, wave + CONCURRENCY)
        ]
        results = await asyncio.gather(client.get("/health/live"), *stories)
        live_statuses.append(results[0].status_code)
        log.extend(results[1:])
    return live_statuses


async def _all_story_ids(client: httpx.AsyncClient) -> list[str]:
    ids: list[str] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = (await client.get("/v1/stories", params=params)).json()
        ids.extend(item["id"] for item in page["items"])
        if page["next_cursor"] is None:
            return ids
        params["cursor"] = page["next_cursor"]


async def test_every_request_is_accounted_for_through_an_outage(
    fake_openai: FakeOpenAI,
    fault_proxy_redis: FaultProxy,
    redis_client: Any,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "history.sqlite3",
        openai_base_url=fake_openai.openai_base_url,
        redis_url=fault_proxy_redis.url_for(),
        resilience=ResilienceSettings(
            _env_file=None,
            retry_base_delay_seconds=0.01,
            retry_max_delay_seconds=0.05,
            breaker_recovery_seconds=0.5,
        ),
    )
    responses: list[httpx.Response] = []
    live: list[int] = []
    async with serve(settings) as client:
        live += await _phase(client, 0, responses)

        fake_openai.set_fault(Fault.status(503), path=COMPLETIONS)
        fault_proxy_redis.set_mode("blackhole")
        live += await _phase(client, PER_PHASE, responses)

        fake_openai.set_fault(None)
        fault_proxy_redis.set_mode("pass")
        await asyncio.sleep(1.1)  # breaker open time and the Redis cool-down pass
        live += await _phase(client, 2 * PER_PHASE, responses)

        # Every request repeated with its key: nothing new is written or called.
        attempts_before_replay = fake_openai.count(path=COMPLETIONS)
        replays = await asyncio.gather(
            *(
                client.post(
                    "/v1/stories",
                    json={**STORY_BODY, "prompt": f"story number {n}"},
                    headers={"Idempotency-Key": f"history-{n}"},
                )
                for n in range(3 * PER_PHASE)
            )
        )
        stored = await _all_story_ids(client)

    total = 3 * PER_PHASE
    assert [r.status_code for r in responses] == [201] * total
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == total
    assert sorted(stored) == sorted(ids)
    assert [r.json()["id"] for r in replays] == ids
    assert fake_openai.count(path=COMPLETIONS) == attempts_before_replay

    providers = [r.json()["provider"] for r in responses]
    assert set(providers[:PER_PHASE]) == {"openai"}
    assert "openai" not in providers[PER_PHASE : 2 * PER_PHASE]
    assert providers[-1] == "openai"

    # First attempts, plus retries within 20% of them and the budget's minimum of
    # 3 per 10 s window (the run spans at most a few windows).
    first_attempts = PER_PHASE * 3
    assert attempts_before_replay <= first_attempts + 0.2 * first_attempts + 3 * 3
    assert set(live) == {200}
