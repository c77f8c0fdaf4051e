"""Admission through the API: callers beyond the limit wait for the healthy upstream
instead of falling down the ladder, and what must be shed is counted with its reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY

from app.platform.config import ResilienceSettings
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"


def shed(reason: str) -> float:
    labels = {"name": "openai:chat", "reason": reason}
    return REGISTRY.get_sample_value("story_admission_shed_total", labels) or 0.0


async def queued_callers(count: int) -> None:
    """Until `count` callers wait for an `openai:chat` slot (the admission gauge)."""
    labels = {"name": "openai:chat"}
    for _ in range(3000):
        if REGISTRY.get_sample_value("story_admission_queued", labels) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} callers queued")


async def test_callers_beyond_the_limit_wait_for_the_healthy_upstream(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # Two slots at most, an upstream answering in 0.6 s, eight callers at once: the
    # last ones wait about 2 s, four times the old fixed bulkhead's 0.5 s.
    fake_openai.set_fault(Fault.delay(0.6), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        request_deadline_seconds=20.0,
        resilience=ResilienceSettings(_env_file=None, concurrency_min=1, concurrency_initial=2),
    )
    settings.openai.max_concurrency = 2
    async with serve(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/stories", json={**STORY_BODY, "age": 2 + n}) for n in range(8))
        )

    assert [answer.status_code for answer in answers] == [201] * 8
    assert {answer.json()["provider"] for answer in answers} == {"openai"}
    assert not any(answer.json()["degraded"] for answer in answers)
    assert fake_openai.count(path=COMPLETIONS) == 8


async def test_a_full_queue_is_shed_down_the_ladder_and_counted(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        request_deadline_seconds=3.0,
        resilience=ResilienceSettings(
            _env_file=None, concurrency_min=1, concurrency_initial=1, queue_max=1
        ),
    )
    before = shed("queue_full")
    async with serve(settings) as client:
        hanging = asyncio.create_task(client.post("/v1/stories", json=STORY_BODY))
        await fake_openai.wait_for_count(1, path=COMPLETIONS)
        queued = asyncio.create_task(client.post("/v1/stories", json={**STORY_BODY, "age": 8}))
        await queued_callers(1)
        overflow = await client.post("/v1/stories", json={**STORY_BODY, "age": 9})
        overflow_done_first = not hanging.done() and not queued.done()
        await asyncio.gather(hanging, queued)

    assert overflow_done_first
    assert overflow.status_code == 201
    assert overflow.json()["provider"] == "offline"
    assert shed("queue_full") - before == 1
    assert fake_openai.count(path=COMPLETIONS) == 1
