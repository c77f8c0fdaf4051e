"""Stories from the real SDKs talking HTTP to the fake OpenAI and Replicate servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest
import replicate.exceptions

from app.providers.base import StoryRequest
from app.providers.openai import OpenAIStoryProvider
from app.providers.replicate import build_client
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve, uvicorn_process

COMPLETIONS = "/v1/chat/completions"
TEXT_MODEL = "meta/meta-llama-3-8b-instruct"


async def test_openai_writes_the_story_when_configured(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json={**STORY_BODY, "length": "medium"})

    assert response.status_code == 201
    story = response.json()
    assert story["provider"] == "openai"
    assert story["degraded"] is False
    assert len(story["paragraphs"]) == 5
    assert fake_openai.count(path=COMPLETIONS) == 1
    sent = next(call for call in fake_openai.calls if call.path == COMPLETIONS)
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.json is not None
    assert sent.json["model"] == "gpt-4o-mini"
    assert sent.json["response_format"]["type"] == "json_schema"
    assert "dragon" in json.dumps(sent.json["messages"])


async def test_token_usage_and_provider_are_stored_in_postgres(
    fake_openai: FakeOpenAI, clean_postgres: str
) -> None:
    settings = make_settings(
        database_url=clean_postgres, openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        story = (await client.post("/v1/stories", json=STORY_BODY)).json()

    conn = await asyncpg.connect(clean_postgres)
    try:
        row = await conn.fetchrow("SELECT * FROM stories WHERE id = $1", story["id"])
    finally:
        await conn.close()
    assert row is not None
    assert row["provider"] == "openai"
    assert row["model"] == "gpt-4o-mini"
    assert row["owner"] == "anonymous"
    assert row["prompt_tokens"] > 0
    assert row["completion_tokens"] > 0
    assert row["generation_ms"] >= 0


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(500),
        Fault.status(401),
        Fault.rate_limit("2"),
        Fault.reset(),
        Fault.malformed(),
        Fault.wrong_shape(),
        Fault.bad_content(),
    ],
    ids=["500", "401", "429", "reset", "malformed", "wrong_shape", "bad_content"],
)
async def test_an_openai_failure_degrades_to_the_offline_story_never_a_500(
    fake_openai: FakeOpenAI, tmp_path: Path, fault: Fault
) -> None:
    fake_openai.set_fault(fault, path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.status_code == 201
    assert response.json()["provider"] == "offline"
    assert response.json()["degraded"] is True
    assert fake_openai.count(path=COMPLETIONS) >= 1


async def test_a_hanging_openai_ends_at_the_read_timeout_and_degrades(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    settings.openai.read_timeout_seconds = 0.3
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.status_code == 201
    assert response.json()["provider"] == "offline"


async def test_replicate_text_model_is_the_second_rung(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(503), path=COMPLETIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json={**STORY_BODY, "length": "long"})

    story = response.json()
    assert response.status_code == 201
    assert story["provider"] == "replicate"
    assert story["degraded"] is True
    assert len(story["paragraphs"]) == 8
    assert fake_replicate.created_count == 1


async def test_replicate_alone_serves_undegraded(
    fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", replicate_base_url=fake_replicate.base_url
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.json()["provider"] == "replicate"
    assert response.json()["degraded"] is False


# Illustrations (drawn in the background, kept in our store): test_illustrations.py


@pytest.mark.parametrize(
    "fault",
    [Fault.status(503), Fault.status(504), Fault.rate_limit(retry_after="0")],
    ids=["503", "504", "429"],
)
async def test_the_replicate_client_makes_one_http_attempt_per_call(
    fake_replicate: FakeReplicate, fault: Fault
) -> None:
    # The SDK's own RetryTransport would send a GET answered 429/503/504 ten times.
    client, transport = build_client(
        make_settings(replicate_base_url=fake_replicate.base_url).replicate
    )
    try:
        prediction = await client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "x"})
        fake_replicate.set_fault(fault, path="/v1/predictions/", method="GET")
        with pytest.raises(replicate.exceptions.ReplicateError) as caught:
            await client.predictions.async_get(prediction.id)
    finally:
        await transport.aclose()

    assert caught.value.status == fault.status_code
    assert fake_replicate.count(method="GET") == 1


async def test_replicate_connections_are_capped_at_replicate_max_connections(
    fake_replicate: FakeReplicate,
) -> None:
    settings = make_settings(replicate_base_url=fake_replicate.base_url).replicate
    settings.max_connections = 2
    fake_replicate.fail_next(Fault.delay(1.0), times=3, method="POST")
    client, transport = build_client(settings)
    try:
        creates = [
            asyncio.ensure_future(
                client.predictions.async_create(model=TEXT_MODEL, input={"prompt": str(n)})
            )
            for n in range(3)
        ]
        await fake_replicate.wait_for_count(2, method="POST")
        await asyncio.sleep(0.3)
        assert fake_replicate.count(method="POST") == 2  # the third waits for a connection
        await asyncio.gather(*creates)
    finally:
        await transport.aclose()

    assert fake_replicate.count(method="POST") == 3


async def test_openai_connections_are_capped_at_openai_max_connections(
    fake_openai: FakeOpenAI,
) -> None:
    settings = make_settings(openai_base_url=fake_openai.openai_base_url).openai
    settings.max_connections = 2
    fake_openai.fail_next(Fault.delay(1.0), times=3, path=COMPLETIONS)
    provider = OpenAIStoryProvider.from_settings(settings)
    request = StoryRequest(prompt="a brave snail", age=5, length="short", language="en")
    try:
        stories = [asyncio.ensure_future(provider.generate(request)) for _ in range(3)]
        await fake_openai.wait_for_count(2, path=COMPLETIONS)
        await asyncio.sleep(0.3)
        assert fake_openai.count(path=COMPLETIONS) == 2  # the third waits for a connection
        await asyncio.gather(*stories)
    finally:
        await provider.close()

    assert fake_openai.count(path=COMPLETIONS) == 3


def test_a_real_server_on_postgres_uses_openai_and_keeps_stories_across_restarts(
    fake_openai: FakeOpenAI, clean_postgres: str
) -> None:
    import httpx

    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "DATABASE_URL": clean_postgres,
    }
    with uvicorn_process(env) as url:
        created = httpx.post(f"{url}/v1/stories", json=STORY_BODY, timeout=10)
    with uvicorn_process(env) as url:
        fetched = httpx.get(f"{url}{created.headers['location']}", timeout=10)

    assert created.status_code == 201
    assert created.json()["provider"] == "openai"
    assert fetched.status_code == 200
    assert fetched.json() == created.json()


def test_a_real_server_on_the_embedded_default_keeps_stories_across_restarts(
    tmp_path: Path,
) -> None:
    import httpx

    env = {"DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3")}
    with uvicorn_process(env) as url:
        created = httpx.post(f"{url}/v1/stories", json=STORY_BODY, timeout=10)
    with uvicorn_process(env) as url:
        fetched = httpx.get(f"{url}{created.headers['location']}", timeout=10)

    assert created.json()["provider"] == "offline"
    assert fetched.json() == created.json()
