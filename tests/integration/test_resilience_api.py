"""The resilience layer seen through the API, against the fake upstreams.

Counts are exact: the fakes record every attempt they receive.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from app.platform.config import ResilienceSettings
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"


def resilience(**changes: Any) -> ResilienceSettings:
    values: dict[str, Any] = {"retry_base_delay_seconds": 0.01, "retry_max_delay_seconds": 0.05}
    values.update(changes)
    return ResilienceSettings(_env_file=None, **values)


async def test_an_always_failing_upstream_gets_three_attempts_then_none_while_open(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        first = await client.post("/v1/stories", json=STORY_BODY)
        attempts_first = fake_openai.count(path=COMPLETIONS)
        second = await client.post("/v1/stories", json={**STORY_BODY, "age": 7})

    assert first.status_code == second.status_code == 201
    assert first.json()["provider"] == second.json()["provider"] == "offline"
    assert first.json()["degraded"] is True
    # Failure threshold 3: three attempts open the breaker, the fourth is refused.
    assert attempts_first == 3
    assert fake_openai.count(path=COMPLETIONS) == 3


async def test_a_client_error_from_the_upstream_is_not_retried(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(400), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        for _ in range(4):
            response = await client.post("/v1/stories", json=STORY_BODY)
            assert response.json()["provider"] == "offline"
        fake_openai.set_fault(None)
        healthy = await client.post("/v1/stories", json=STORY_BODY)

    # One attempt each, and 400s never open the breaker.
    assert fake_openai.count(path=COMPLETIONS) == 5
    assert healthy.json()["provider"] == "openai"


async def test_retry_after_from_a_429_is_waited_instead_of_the_backoff(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.fail_next(Fault.rate_limit("2"), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    calls = [call for call in fake_openai.calls if call.path == COMPLETIONS]
    assert response.json()["provider"] == "openai"
    assert len(calls) == 2
    # The backoff here is at most 0.05 s; the upstream asked for 2 s.
    assert calls[1].at - calls[0].at >= 1.9


async def test_a_retry_after_beyond_the_ceiling_falls_back_at_once(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.rate_limit("600"), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.json()["provider"] == "offline"
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_a_hanging_upstream_ends_at_the_request_deadline_with_a_fallback(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        request_deadline_seconds=1.0,
    )
    async with serve(settings) as client:
        story = asyncio.create_task(client.post("/v1/stories", json=STORY_BODY))
        await fake_openai.wait_for_count(1, path=COMPLETIONS)
        live = await client.get("/health/live")
        still_waiting = not story.done()
        response = await story

    assert live.status_code == 200
    assert still_waiting
    assert response.status_code == 201
    assert response.json()["provider"] == "offline"
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_a_full_bulkhead_sends_the_overflow_down_the_ladder_at_once(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        request_deadline_seconds=3.0,
        # A limit of one (no sample arrives while the first call hangs) and no queue.
        resilience=resilience(concurrency_min=1, concurrency_initial=1, queue_max=0),
    )
    async with serve(settings) as client:
        slow = asyncio.create_task(client.post("/v1/stories", json=STORY_BODY))
        await fake_openai.wait_for_count(1, path=COMPLETIONS)
        overflow = await client.post("/v1/stories", json={**STORY_BODY, "age": 8})
        slow_was_pending = not slow.done()
        await slow

    assert slow_was_pending
    assert overflow.status_code == 201
    assert overflow.json()["provider"] == "offline"
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_nothing_to_serve_is_a_503_with_retry_after_until_the_breaker_may_close(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        resilience=resilience(offline_fallback=False),
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)
        listed = await client.get("/v1/stories")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert 110 <= int(response.headers["retry-after"]) <= 120
    assert listed.json()["items"] == []


async def test_a_story_an_upstream_wrote_is_served_from_cache_when_upstreams_fail(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        original = (await client.post("/v1/stories", json=STORY_BODY)).json()
        fake_openai.set_fault(Fault.status(503), path=COMPLETIONS)
        # Same request, differently spaced and cased: the normalised key matches.
        repeat = await client.post(
            "/v1/stories", json={**STORY_BODY, "prompt": "A  dragon who is AFRAID of the dark"}
        )
        other = await client.post("/v1/stories", json={**STORY_BODY, "prompt": "a kind whale"})

    cached = repeat.json()
    assert cached["provider"] == "cache"
    assert cached["degraded"] is True
    assert cached["paragraphs"] == original["paragraphs"]
    assert cached["id"] != original["id"]
    assert other.json()["provider"] == "offline"


async def test_the_cache_is_shared_through_redis(
    fake_openai: FakeOpenAI, tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    writer = make_settings(
        sqlite_path=tmp_path / "a.db",
        openai_base_url=fake_openai.openai_base_url,
        redis_url=redis_url,
    )
    async with serve(writer) as client:
        original = (await client.post("/v1/stories", json=STORY_BODY)).json()
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    reader = make_settings(
        sqlite_path=tmp_path / "b.db",
        openai_base_url=fake_openai.openai_base_url,
        redis_url=redis_url,
    )
    async with serve(reader) as client:
        served = (await client.post("/v1/stories", json=STORY_BODY)).json()

    assert served["provider"] == "cache"
    assert served["paragraphs"] == original["paragraphs"]


async def test_a_replicate_create_whose_reply_is_lost_is_found_not_paid_twice(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(400), path=COMPLETIONS)
    # The fake creates the prediction, then never answers the create request.
    fake_replicate.fail_next(Fault.hang(), path="/v1/models/", method="POST")
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
    )
    settings.replicate.read_timeout_seconds = 0.5
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.json()["provider"] == "replicate"
    assert fake_replicate.created_count == 1
    assert fake_replicate.count(method="GET", path="/v1/predictions") >= 2


async def test_replicate_failing_too_goes_to_offline_and_counts_its_attempts(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500), path=COMPLETIONS)
    fake_replicate.set_fault(Fault.status(502), path="/v1/models/", method="POST")
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.json()["provider"] == "offline"
    assert fake_openai.count(path=COMPLETIONS) == 3
    assert fake_replicate.count(method="POST", path="/v1/models/") == 3


async def test_a_failed_poll_keeps_polling_the_same_prediction(
    fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_replicate.fail_next(Fault.status(503), path="/v1/predictions/", method="GET")
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", replicate_base_url=fake_replicate.base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.json()["provider"] == "replicate"
    assert fake_replicate.created_count == 1


async def test_a_lost_create_that_cannot_be_found_is_not_sent_again(
    fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_replicate.fail_next(Fault.reset(), path="/v1/models/", method="POST")
    fake_replicate.set_fault(Fault.status(503), path="/v1/predictions", method="GET")
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", replicate_base_url=fake_replicate.base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.json()["provider"] == "offline"
    assert fake_replicate.created_count == 1


async def test_a_stalled_prediction_is_cancelled_counted_and_opens_the_breaker(
    fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_replicate.steps_to_finish = 10_000
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", replicate_base_url=fake_replicate.base_url
    )
    settings.replicate.prediction_timeout_seconds = 0.3
    async with serve(settings) as client:
        responses = [
            await client.post("/v1/stories", json={**STORY_BODY, "age": age})
            for age in (3, 4, 5, 6)
        ]

    assert [r.json()["provider"] for r in responses] == ["offline"] * 4
    # Never retried by creating another; three stalls open the breaker; the fourth
    # request creates nothing.
    assert fake_replicate.created_count == 3
    assert {p["status"] for p in fake_replicate.predictions()} == {"canceled"}


async def test_a_hanging_openai_leaves_replicate_time_and_its_breaker_opens(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    # Deadline 3 s: OpenAI's rung may use 60% of what is left after the 0.5 s
    # reserve (1.5 s), which leaves Replicate about a second: plenty for the fake.
    fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
        request_deadline_seconds=3.0,
        resilience=resilience(ladder_reserve_seconds=0.5, rung_share=0.6),
    )
    async with serve(settings) as client:
        hung = [
            await client.post("/v1/stories", json={**STORY_BODY, "age": age}) for age in (4, 5, 6)
        ]
        hangs_seen = fake_openai.count(path=COMPLETIONS)
        after_opening = await client.post("/v1/stories", json={**STORY_BODY, "age": 7})

    assert [r.json()["provider"] for r in hung] == ["replicate"] * 3
    # Each hang was cut at the rung's deadline and counted as a failure: three open
    # OpenAI's breaker (threshold 3), and the fourth request does not wait for it.
    assert hangs_seen == 3
    assert after_opening.json()["provider"] == "replicate"
    assert fake_openai.count(path=COMPLETIONS) == 3
