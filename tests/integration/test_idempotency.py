"""Idempotency-Key on POST /v1/stories: phones retry, stories and upstream calls do not double."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.platform.config import Settings
from app.providers.base import StoryRequest
from app.services.stories import request_fingerprint
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve, uvicorn_process

COMPLETIONS = "/v1/chat/completions"
SettingsFactory = Callable[..., Settings]


@pytest.fixture(params=["sqlite", "postgres"])
def settings_for(request: pytest.FixtureRequest, tmp_path: Path) -> SettingsFactory:
    if request.param == "postgres":
        url: str = request.getfixturevalue("clean_postgres")
        return lambda **kw: make_settings(database_url=url, **kw)
    return lambda **kw: make_settings(sqlite_path=tmp_path / "s.sqlite3", **kw)


async def test_a_repeat_with_the_same_key_returns_the_first_story_without_a_new_call(
    settings_for: SettingsFactory, fake_openai: FakeOpenAI
) -> None:
    settings = settings_for(openai_base_url=fake_openai.openai_base_url)
    headers = {"Idempotency-Key": "phone-retry-1"}
    async with serve(settings) as client:
        first = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        again = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        listed = (await client.get("/v1/stories")).json()

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert fake_openai.count(path=COMPLETIONS) == 1
    assert len(listed["items"]) == 1


async def test_different_keys_make_different_stories(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for()) as client:
        a = await client.post("/v1/stories", json=STORY_BODY, headers={"Idempotency-Key": "a"})
        b = await client.post("/v1/stories", json=STORY_BODY, headers={"Idempotency-Key": "b"})

    assert a.json()["id"] != b.json()["id"]


async def test_the_same_key_with_another_body_is_a_422_and_stores_nothing(
    settings_for: SettingsFactory,
) -> None:
    headers = {"Idempotency-Key": "reused"}
    async with serve(settings_for()) as client:
        await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        other = await client.post("/v1/stories", json={**STORY_BODY, "age": 9}, headers=headers)
        listed = (await client.get("/v1/stories")).json()

    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["errors"] == [
        {"field": "Idempotency-Key", "reason": "already used with a different request body"}
    ]
    assert len(listed["items"]) == 1


@pytest.mark.parametrize("key", ["has space", "x" * 256, "tab\there"])
async def test_a_malformed_key_is_a_422_on_the_header(
    settings_for: SettingsFactory, key: str
) -> None:
    async with serve(settings_for()) as client:
        response = await client.post(
            "/v1/stories", json=STORY_BODY, headers={"Idempotency-Key": key}
        )

    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["Idempotency-Key"]


async def test_concurrent_duplicates_make_one_upstream_call_and_one_story(
    settings_for: SettingsFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.set_fault(Fault.delay(0.5), path=COMPLETIONS)
    settings = settings_for(openai_base_url=fake_openai.openai_base_url)
    headers = {"Idempotency-Key": "double-tap"}
    async with serve(settings) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/stories", json=STORY_BODY, headers=headers) for _ in range(5))
        )
        listed = (await client.get("/v1/stories")).json()

    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 4
    assert fake_openai.count(path=COMPLETIONS) == 1
    assert len(listed["items"]) == 1


async def test_a_repeat_gets_409_with_retry_after_when_the_first_outlasts_the_wait(
    settings_for: SettingsFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.set_fault(Fault.delay(1.5), path=COMPLETIONS)
    settings = settings_for(
        openai_base_url=fake_openai.openai_base_url, idempotency_wait_seconds=0.2
    )
    headers = {"Idempotency-Key": "slow-one"}
    async with serve(settings) as client:
        first = asyncio.create_task(client.post("/v1/stories", json=STORY_BODY, headers=headers))
        await asyncio.sleep(0.3)
        repeat = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        finished = await first

    assert repeat.status_code == 409
    assert repeat.headers["retry-after"] == "1"
    assert repeat.headers["content-type"] == "application/problem+json"
    assert finished.status_code == 201
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_a_claim_left_by_a_dead_worker_is_taken_over_after_its_lock(
    clean_postgres: str,
) -> None:
    settings = make_settings(database_url=clean_postgres)
    body_request = StoryRequest(prompt=STORY_BODY["prompt"], age=6, length="short", language="en")
    now = datetime.now(UTC)
    async with serve(settings) as client:
        conn = await asyncpg.connect(clean_postgres)
        try:
            await conn.execute(
                "INSERT INTO idempotency_keys (owner, key, fingerprint, state, locked_until, "
                "created_at, expires_at) "
                "VALUES ('anonymous', 'orphan', $1, 'pending', $2, $3, $4)",
                request_fingerprint(body_request, False),
                now - timedelta(seconds=1),
                now - timedelta(seconds=120),
                now + timedelta(hours=24),
            )
        finally:
            await conn.close()
        response = await client.post(
            "/v1/stories", json=STORY_BODY, headers={"Idempotency-Key": "orphan"}
        )

    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers


async def test_expired_keys_are_purged(clean_postgres: str) -> None:
    from app.db.postgres import PostgresStoryRepository

    repo = await PostgresStoryRepository.connect(
        clean_postgres, min_size=1, max_size=1, command_timeout=5, connect_timeout=5
    )
    try:
        await repo.migrate()
        now = datetime.now(UTC)
        await repo.claim_key(
            "o", "old", "f", now=now, locked_until=now, expires_at=now - timedelta(seconds=1)
        )
        await repo.claim_key(
            "o", "new", "f", now=now, locked_until=now, expires_at=now + timedelta(hours=1)
        )
        purged = await repo.purge_expired_keys(now)
        remaining = await repo.claim_key(
            "o", "new", "other", now=now, locked_until=now, expires_at=now
        )
    finally:
        await repo.close()

    assert purged == 1
    assert remaining is not None
    assert remaining.fingerprint == "f"


def test_two_server_processes_on_one_database_share_keys(
    fake_openai: FakeOpenAI, clean_postgres: str
) -> None:
    fake_openai.set_fault(Fault.delay(0.5), path=COMPLETIONS)
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "DATABASE_URL": clean_postgres,
        "RATE_LIMIT_CREATE_STORY": "10000/minute",
    }
    headers = {"Idempotency-Key": "two-replicas"}

    def post(url: str) -> Any:
        return httpx.post(f"{url}/v1/stories", json=STORY_BODY, headers=headers, timeout=30)

    with (
        uvicorn_process(env) as one,
        uvicorn_process(env) as two,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        responses = list(pool.map(post, [one, two, one, two]))

    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_a_request_that_outlives_its_claim_stores_nothing_and_gets_409(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    from app.db.sqlite import SqliteStoryRepository
    from app.errors import ConflictError
    from app.platform.config import OpenAISettings
    from app.providers.offline import OfflineStoryProvider
    from app.providers.openai import OpenAIStoryProvider
    from app.services.stories import IdempotencyPolicy, StoryService

    fake_openai.fail_next(Fault.delay(0.6), path=COMPLETIONS)
    repository = await SqliteStoryRepository.open(tmp_path / "claims.sqlite3")
    await repository.migrate()
    provider = OpenAIStoryProvider.from_settings(
        OpenAISettings(_env_file=None, api_key="sk-test", base_url=fake_openai.openai_base_url)
    )
    service = StoryService(
        repository,
        [provider],
        offline=OfflineStoryProvider(),
        idempotency=IdempotencyPolicy(lock_seconds=0.2, wait_seconds=0),
    )
    request = StoryRequest(prompt="a slow snail", age=5, length="short", language="en")
    try:
        slow = asyncio.create_task(
            service.create("anonymous", request, illustrate=False, idempotency_key="k")
        )
        await asyncio.sleep(0.35)  # the slow request's claim has expired
        taken_over = await service.create(
            "anonymous", request, illustrate=False, idempotency_key="k"
        )
        with pytest.raises(ConflictError):
            await slow
        replay = await service.create("anonymous", request, illustrate=False, idempotency_key="k")
        page = await repository.list_page("anonymous", 10)
    finally:
        await provider.close()
        await repository.close()

    assert replay.replayed is True
    assert replay.story.id == taken_over.story.id
    assert [s.id for s in page.items] == [taken_over.story.id]
