"""Prove the fake upstreams against the official SDKs and a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import openai
import pytest
import redis.asyncio as aioredis
import redis.exceptions
import replicate.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from replicate.client import Client as ReplicateClient
from replicate.client import RetryTransport

from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate, text_tokens
from tests.fakes.server import Fault, http_date, make_story

TEXT_MODEL = "meta/meta-llama-3-8b-instruct"
IMAGE_MODEL = "black-forest-labs/flux-schnell"
CHAT_PATH = "/v1/chat/completions"


def _assert_story(content: str | None, paragraphs: int = 3) -> dict[str, Any]:
    assert content is not None
    story = json.loads(content)
    assert isinstance(story, dict)
    assert set(story) == {"title", "paragraphs"}
    assert isinstance(story["title"], str)
    assert story["title"]
    assert len(story["paragraphs"]) == paragraphs
    assert all(isinstance(p, str) and p for p in story["paragraphs"])
    return story


# --- OpenAI ---------------------------------------------------------------------------


@pytest.fixture
async def openai_client(fake_openai: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        api_key="sk-test", base_url=fake_openai.openai_base_url, max_retries=0
    )
    try:
        yield client
    finally:
        await client.close()


async def _chat(client: openai.AsyncOpenAI, text: str = "A brave little toaster") -> str | None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You write children's stories as JSON."},
            {"role": "user", "content": text},
        ],
        response_format={"type": "json_object"},
    )
    return completion.choices[0].message.content


async def test_openai_fixture_is_reset_before_each_test(fake_openai: FakeOpenAI) -> None:
    assert fake_openai.calls == []
    assert fake_openai.pending_faults() == 0
    assert fake_openai.replies_served == 0


async def test_openai_completion_parses(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    completion = await openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Write a story. paragraphs: 5"},
            {"role": "user", "content": "ignored earlier message"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "A dragon who is afraid of the dark"},
        ],
        response_format={"type": "json_object"},
    )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].finish_reason == "stop"
    story = _assert_story(completion.choices[0].message.content, paragraphs=5)
    assert "A dragon who is afraid of the dark" in story["title"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert fake_openai.count() == 1
    assert fake_openai.replies_served == 1
    call = fake_openai.calls[0]
    assert (call.method, call.path) == ("POST", CHAT_PATH)
    assert call.headers["authorization"] == "Bearer sk-test"
    assert call.json is not None
    assert call.json["response_format"] == {"type": "json_object"}


async def test_openai_story_is_deterministic_and_honours_paragraphs(
    openai_client: openai.AsyncOpenAI,
) -> None:
    first = await _chat(openai_client, "The moon's lost sock\nparagraphs: 2")
    second = await _chat(openai_client, "The moon's lost sock\nparagraphs: 2")
    assert first == second
    story = _assert_story(first, paragraphs=2)
    assert story == make_story("The moon's lost sock", 2)
    assert "paragraphs" not in story["title"]
    long_prompt = "word " * 200
    assert len(_assert_story(await _chat(openai_client, long_prompt))["title"]) < 100


async def test_openai_models_list(openai_client: openai.AsyncOpenAI) -> None:
    page = await openai_client.models.list()
    assert [model.id for model in page.data] == ["gpt-4o-mini"]


async def test_openai_requires_bearer_token(fake_openai: FakeOpenAI) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake_openai.openai_base_url + "/chat/completions", json={}) as response,
    ):
        assert response.status == 401
        body = await response.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    assert fake_openai.count() == 1


async def test_openai_500_fault(fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI) -> None:
    fake_openai.fail_next(Fault.status(500))
    with pytest.raises(openai.InternalServerError) as caught:
        await _chat(openai_client)
    assert caught.value.status_code == 500
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "server_error"
    assert fake_openai.count(method="POST", path=CHAT_PATH) == 1
    assert fake_openai.replies_served == 0


async def test_openai_400_fault_body(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.status(400, "bad prompt"))
    with pytest.raises(openai.BadRequestError) as caught:
        await _chat(openai_client)
    assert caught.value.body == {
        "message": "bad prompt",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


async def test_openai_rate_limit_fault(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.rate_limit())
    with pytest.raises(openai.RateLimitError) as caught:
        await _chat(openai_client)
    assert caught.value.response.headers["retry-after"] == "2"
    assert "retry-after-ms" not in caught.value.response.headers
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "rate_limit_exceeded"

    date = http_date(5)
    fake_openai.fail_next(Fault.rate_limit(retry_after=date, retry_after_ms=1500))
    with pytest.raises(openai.RateLimitError) as caught:
        await _chat(openai_client)
    assert caught.value.response.headers["retry-after"] == date
    assert caught.value.response.headers["retry-after-ms"] == "1500"

    fake_openai.fail_next(Fault.rate_limit(retry_after=None))
    with pytest.raises(openai.RateLimitError) as caught:
        await _chat(openai_client)
    assert "retry-after" not in caught.value.response.headers
    assert fake_openai.count() == 3


async def test_openai_sdk_retries_are_counted_exactly(fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(Fault.rate_limit(retry_after=None, retry_after_ms=10), times=2)
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=fake_openai.openai_base_url, max_retries=2
    ) as client:
        _assert_story(await _chat(client))
    assert fake_openai.count(path=CHAT_PATH) == 3
    assert fake_openai.replies_served == 1
    idempotency_keys = {call.headers.get("idempotency-key") for call in fake_openai.calls}
    assert len(idempotency_keys) == 1


async def test_openai_hang_fault_times_out(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.hang())
    with pytest.raises(openai.APITimeoutError):
        await _chat(openai_client.with_options(timeout=0.5))
    assert fake_openai.count() == 1
    assert fake_openai.replies_served == 0


async def test_openai_reset_fault(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.reset())
    with pytest.raises(openai.APIConnectionError) as caught:
        await _chat(openai_client)
    # with the default httpx2 transport a reset is NOT reported as a timeout
    assert not isinstance(caught.value, openai.APITimeoutError)
    assert fake_openai.count() == 1


async def test_openai_malformed_fault_raises_json_decode_error(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.malformed())
    # The SDK does not wrap this: a 200 whose body is not JSON escapes as a raw ValueError.
    with pytest.raises(json.JSONDecodeError):
        await _chat(openai_client)
    assert fake_openai.count() == 1
    assert fake_openai.replies_served == 0


async def test_openai_bad_content_fault(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.bad_content())
    content = await _chat(openai_client)
    assert content is not None
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)
    _assert_story(await _chat(openai_client))


async def test_openai_delay_fault(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.delay(0.3))
    started = time.monotonic()
    _assert_story(await _chat(openai_client))
    assert time.monotonic() - started >= 0.25  # loose lower bound only
    fake_openai.fail_next(Fault.delay(5))
    with pytest.raises(openai.APITimeoutError):
        await _chat(openai_client.with_options(timeout=0.3))
    assert fake_openai.count() == 2
    assert fake_openai.replies_served == 1


async def test_openai_fail_next_is_fifo_then_normal(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.status(500))
    fake_openai.fail_next(Fault.status(503))
    with pytest.raises(openai.InternalServerError) as first:
        await _chat(openai_client)
    with pytest.raises(openai.InternalServerError) as second:
        await _chat(openai_client)
    assert (first.value.status_code, second.value.status_code) == (500, 503)
    _assert_story(await _chat(openai_client))
    assert fake_openai.count() == 3
    assert [call.fault for call in fake_openai.calls] == [
        Fault.status(500),
        Fault.status(503),
        None,
    ]


async def test_openai_fault_matching_by_path_and_method(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.status(500), path="/v1/models")
    fake_openai.fail_next(Fault.status(502), method="GET")
    _assert_story(await _chat(openai_client))  # neither queued fault matches a POST
    assert fake_openai.pending_faults() == 2
    with pytest.raises(openai.InternalServerError) as caught:
        await openai_client.models.list()
    assert caught.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as caught:
        await openai_client.models.list()
    assert caught.value.status_code == 502
    assert fake_openai.pending_faults() == 0
    assert fake_openai.count(method="GET") == 2
    assert fake_openai.count(method="post", path="/v1/chat") == 1


async def test_openai_persistent_fault_and_precedence(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.set_fault(Fault.status(503), path=CHAT_PATH)
    fake_openai.fail_next(Fault.rate_limit())
    with pytest.raises(openai.RateLimitError):
        await _chat(openai_client)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await _chat(openai_client)
    await openai_client.models.list()  # other paths are not affected
    fake_openai.set_fault(None, path=CHAT_PATH)
    _assert_story(await _chat(openai_client))
    assert fake_openai.count(path=CHAT_PATH) == 4


async def test_openai_rejects_unsupported_fault(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(ValueError, match="prediction_failed"):
        fake_openai.fail_next(Fault.prediction_failed())


async def test_openai_concurrent_calls_are_counted_exactly(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.status(500), times=5)
    results = await asyncio.gather(
        *(_chat(openai_client, f"story {i}") for i in range(25)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, openai.InternalServerError)]
    assert len(failures) == 5
    assert fake_openai.count(path=CHAT_PATH) == 25
    assert fake_openai.replies_served == 20


async def test_openai_with_default_aiohttp_client(fake_openai: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(
        api_key="sk-test",
        base_url=fake_openai.openai_base_url,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    ) as client:
        _assert_story(await _chat(client))

        fake_openai.fail_next(Fault.rate_limit())
        with pytest.raises(openai.RateLimitError) as caught:
            await _chat(client)
        assert caught.value.response.headers["retry-after"] == "2"

        fake_openai.fail_next(Fault.hang())
        with pytest.raises(openai.APITimeoutError):
            await _chat(client.with_options(timeout=0.5))

        # The vendored aiohttp transport maps every aiohttp.ClientConnectionError (reset,
        # server disconnect) to httpx ConnectTimeout, so a reset surfaces as a *timeout*.
        fake_openai.fail_next(Fault.reset())
        with pytest.raises(openai.APITimeoutError):
            await _chat(client)

        fake_openai.fail_next(Fault.malformed())
        with pytest.raises(json.JSONDecodeError):
            await _chat(client)
    assert fake_openai.count() == 5


async def test_stop_releases_hanging_request_and_restart_keeps_port() -> None:
    fake = FakeOpenAI()
    fake.start()
    try:
        base_url = fake.openai_base_url
        fake.set_fault(Fault.hang())
        async with openai.AsyncOpenAI(
            api_key="sk-test", base_url=base_url, max_retries=0, timeout=30
        ) as client:
            pending = asyncio.ensure_future(_chat(client))
            await fake.wait_for_count(1)
            await asyncio.wait_for(asyncio.to_thread(fake.stop), 20)  # guard, not a threshold
            with pytest.raises(openai.APIConnectionError):
                await asyncio.wait_for(pending, 20)

            with pytest.raises(openai.APIConnectionError):  # stopped: connection refused
                await _chat(client)

            fake.start()
            assert fake.openai_base_url == base_url
            fake.set_fault(None)
            _assert_story(await _chat(client))
    finally:
        fake.stop()
        fake.stop()  # idempotent


async def test_reset_releases_hanging_request(fake_openai: FakeOpenAI) -> None:
    fake_openai.set_fault(Fault.hang())
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=fake_openai.openai_base_url, max_retries=0, timeout=30
    ) as client:
        pending = asyncio.ensure_future(_chat(client))
        await fake_openai.wait_for_count(1)
        await asyncio.to_thread(fake_openai.reset)
        with pytest.raises(openai.APIConnectionError):
            await asyncio.wait_for(pending, 20)
        assert fake_openai.count() == 0
        _assert_story(await _chat(client))


# --- OpenAI moderations -----------------------------------------------------------------

MODERATIONS_PATH = "/v1/moderations"


async def test_openai_moderation_parses_and_flags_configured_words(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.moderations.create(
        model="omni-moderation-latest", input="how to hurt my little sister with a KNIFE"
    )
    assert reply.id.startswith("modr-")
    assert reply.model == "omni-moderation-latest"
    [result] = reply.results
    assert result.flagged is True
    assert result.categories.violence is True
    assert result.categories.sexual is False
    assert result.categories.self_harm is False
    assert result.category_scores.violence > result.category_scores.sexual
    assert result.category_applied_input_types is not None
    assert fake_openai.moderations_served == 1
    assert fake_openai.replies_served == 0  # chat completions are counted apart
    assert fake_openai.moderation_inputs() == ["how to hurt my little sister with a KNIFE"]


async def test_openai_moderation_matches_whole_words_and_takes_lists(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.flag_words(["zorblax"], category="hate")
    reply = await openai_client.moderations.create(
        input=["a dragon who is afraid of the dark", "skills and a thankful heart", "ZORBLAX!"]
    )
    assert [r.flagged for r in reply.results] == [False, False, True]
    assert reply.results[2].categories.hate is True
    assert reply.model == "omni-moderation-latest"  # the API's default model
    parts = await openai_client.moderations.create(
        input=[{"type": "text", "text": "a gun"}], model="omni-moderation-latest"
    )
    assert parts.results[0].flagged is True


async def test_openai_moderation_words_are_reset_between_tests(fake_openai: FakeOpenAI) -> None:
    fake_openai.flag_words(["teddy"])
    fake_openai.story_extra = "An extra sentence."
    fake_openai.reset()
    assert "teddy" not in fake_openai.moderation_words
    assert "knife" in fake_openai.moderation_words
    assert fake_openai.story_extra == ""
    with pytest.raises(ValueError, match="unknown moderation category"):
        fake_openai.flag_words(["teddy"], category="rudeness")


async def test_openai_moderation_refuses_a_request_without_input(
    fake_openai: FakeOpenAI,
) -> None:
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer sk-test"}) as session,
        session.post(fake_openai.openai_base_url + "/moderations", json={"model": "m"}) as bad,
    ):
        assert bad.status == 400
        assert (await bad.json())["error"]["type"] == "invalid_request_error"
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake_openai.openai_base_url + "/moderations", json={"input": "x"}) as anon,
    ):
        assert anon.status == 401
    assert fake_openai.moderations_served == 0


async def test_openai_moderation_faults(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.fail_next(Fault.status(503), path=MODERATIONS_PATH)
    with pytest.raises(openai.InternalServerError):
        await openai_client.moderations.create(input="a dragon")
    fake_openai.fail_next(Fault.rate_limit("7"), path=MODERATIONS_PATH)
    with pytest.raises(openai.RateLimitError) as limited:
        await openai_client.moderations.create(input="a dragon")
    assert limited.value.response.headers["retry-after"] == "7"
    fake_openai.fail_next(Fault.malformed(), path=MODERATIONS_PATH)
    with pytest.raises(json.JSONDecodeError):
        await openai_client.moderations.create(input="a dragon")
    fake_openai.fail_next(Fault.hang(), path=MODERATIONS_PATH)
    with pytest.raises(openai.APITimeoutError):
        await openai_client.with_options(timeout=0.3).moderations.create(input="a dragon")
    fake_openai.fail_next(Fault.reset(), path=MODERATIONS_PATH)
    with pytest.raises(openai.APIConnectionError):
        await openai_client.moderations.create(input="a dragon")
    fake_openai.fail_next(Fault.delay(0.05), path=MODERATIONS_PATH)
    assert (await openai_client.moderations.create(input="a dragon")).results[0].flagged is False
    fake_openai.fail_next(Fault.bad_content(), path=MODERATIONS_PATH)
    garbled = await openai_client.moderations.create(input="a dragon")
    assert garbled.results[0].flagged is None  # no verdict: a client must not read a pass

    assert fake_openai.count(path=MODERATIONS_PATH) == 7
    assert fake_openai.count(path=CHAT_PATH) == 0
    assert fake_openai.moderations_served == 2  # the delayed and the garbled reply


async def test_openai_story_extra_goes_into_the_story_only(
    fake_openai: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    fake_openai.story_extra = "Then a zorblax came."
    story = _assert_story(await _chat(openai_client, "A brave little toaster"))
    assert story["paragraphs"][0].endswith("Then a zorblax came.")
    assert "zorblax" not in story["title"]


# --- Replicate ------------------------------------------------------------------------


def _make_replicate_client(fake: FakeReplicate, **kwargs: Any) -> ReplicateClient:
    client = ReplicateClient(api_token="r8_test", base_url=fake.base_url, **kwargs)
    transport = client._async_client._transport
    assert isinstance(transport, RetryTransport)
    transport.max_attempts = 1  # no hidden GET retries on 429/503/504: exact counts
    return client


@pytest.fixture
async def replicate_client(fake_replicate: FakeReplicate) -> AsyncIterator[ReplicateClient]:
    client = _make_replicate_client(fake_replicate)
    try:
        yield client
    finally:
        await client._async_client.aclose()


async def _poll(client: ReplicateClient, prediction_id: str) -> Any:
    for _ in range(50):
        prediction = await client.predictions.async_get(prediction_id)
        if prediction.status in ("succeeded", "failed", "canceled"):
            return prediction
    raise AssertionError("prediction never finished")


async def test_replicate_fixture_is_reset_before_each_test(fake_replicate: FakeReplicate) -> None:
    assert fake_replicate.calls == []
    assert fake_replicate.created_count == 0
    assert fake_replicate.predictions() == []
    assert fake_replicate.steps_to_finish == 2


async def test_replicate_text_prediction(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    prediction = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "A penguin who wants to fly\nparagraphs: 4"}
    )
    assert prediction.status == "starting"
    assert prediction.model == TEXT_MODEL
    assert prediction.output is None
    assert prediction.created_at is not None
    assert prediction.created_at.endswith("Z")
    assert prediction.urls is not None
    assert prediction.urls["get"] == f"{fake_replicate.base_url}/v1/predictions/{prediction.id}"

    statuses = []
    while prediction.status not in ("succeeded", "failed", "canceled"):
        prediction = await replicate_client.predictions.async_get(prediction.id)
        statuses.append(prediction.status)
    assert statuses == ["processing", "succeeded"]
    assert isinstance(prediction.output, list)
    assert all(isinstance(token, str) for token in prediction.output)
    assert len(prediction.output) > 1
    story = _assert_story("".join(prediction.output), paragraphs=4)
    assert "A penguin who wants to fly" in story["title"]
    assert prediction.metrics is not None
    assert prediction.metrics["output_token_count"] == len(prediction.output)
    assert prediction.metrics["input_token_count"] > 0
    assert prediction.completed_at is not None

    assert fake_replicate.created_count == 1
    assert fake_replicate.count(method="POST", path=f"/v1/models/{TEXT_MODEL}/predictions") == 1
    assert fake_replicate.count(method="GET", path="/v1/predictions/") == 2
    assert fake_replicate.calls[0].json == {
        "input": {"prompt": "A penguin who wants to fly\nparagraphs: 4"}
    }


async def test_replicate_steps_to_finish(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    fake_replicate.steps_to_finish = 4
    prediction = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "slow"}
    )
    statuses = [
        (await replicate_client.predictions.async_get(prediction.id)).status for _ in range(5)
    ]
    assert statuses == ["processing", "processing", "processing", "succeeded", "succeeded"]

    fake_replicate.steps_to_finish = 0
    instant = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "fast"}
    )
    assert instant.status == "succeeded"
    fake_replicate.reset()
    assert fake_replicate.steps_to_finish == 2


async def test_replicate_prefer_wait_and_image_output(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    output = await replicate_client.async_run(IMAGE_MODEL, input={"prompt": "a red kite"})
    assert fake_replicate.calls[0].headers["prefer"] == "wait"
    assert fake_replicate.count(method="GET") == 0  # finished at once, no polling
    assert isinstance(output, list)
    assert len(output) == 1
    url = str(output[0])
    assert url.startswith(fake_replicate.base_url + "/files/")
    assert url.endswith(".webp")
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.content == fake_replicate.picture_bytes()[0]
    assert response.content.startswith(b"RIFF")

    text = await replicate_client.async_run(TEXT_MODEL, input={"prompt": "a quiet owl"})
    assert isinstance(text, list)
    _assert_story("".join(text))
    assert fake_replicate.created_count == 2


async def test_replicate_create_by_version(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    version = fake_replicate.version_id(IMAGE_MODEL)
    prediction = await replicate_client.predictions.async_create(
        version=version, input={"prompt": "x"}
    )
    assert prediction.model == IMAGE_MODEL
    assert prediction.version == version
    assert fake_replicate.calls[0].json == {"version": version, "input": {"prompt": "x"}}
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await replicate_client.predictions.async_create(version="f" * 64, input={})
    assert caught.value.status == 422


async def test_replicate_error_faults(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    fake_replicate.fail_next(Fault.status(500))
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await replicate_client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "x"})
    assert caught.value.status == 500
    assert caught.value.title == "Internal Server Error"

    fake_replicate.fail_next(Fault.status(422, "prompt too long"), method="POST")
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await replicate_client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "x"})
    assert (caught.value.status, caught.value.detail) == (422, "prompt too long")

    fake_replicate.fail_next(Fault.rate_limit())
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await replicate_client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "x"})
    assert caught.value.status == 429
    assert caught.value.title == "Request was throttled"
    assert fake_replicate.created_count == 0

    prediction = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "x"}
    )
    fake_replicate.fail_next(Fault.status(503), path="/v1/predictions/")
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await replicate_client.predictions.async_get(prediction.id)
    assert caught.value.status == 503
    assert fake_replicate.count(method="GET") == 1  # max_attempts=1: no transport retry
    assert fake_replicate.count() == 5


async def test_replicate_sdk_transport_retries_gets_by_default(
    fake_replicate: FakeReplicate,
) -> None:
    client = ReplicateClient(api_token="r8_test", base_url=fake_replicate.base_url)
    try:
        prediction = await client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "x"})
        fake_replicate.fail_next(Fault.rate_limit(retry_after="0"), times=2)
        await client.predictions.async_get(prediction.id)
        # one SDK call, three HTTP attempts: why the tests set max_attempts = 1
        assert fake_replicate.count(method="GET") == 3
    finally:
        await client._async_client.aclose()


async def test_replicate_prediction_failed(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    fake_replicate.fail_next(Fault.prediction_failed("NSFW content detected"))
    prediction = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "x"}
    )
    assert prediction.status == "starting"
    finished = await _poll(replicate_client, prediction.id)
    assert finished.status == "failed"
    assert finished.error == "NSFW content detected"
    assert finished.output is None

    fake_replicate.fail_next(Fault.prediction_failed())
    with pytest.raises(replicate.exceptions.ModelError):
        await replicate_client.async_run(IMAGE_MODEL, input={"prompt": "x"})
    assert fake_replicate.created_count == 2


async def test_replicate_bad_content(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    fake_replicate.fail_next(Fault.bad_content())
    prediction = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "x"}
    )
    finished = await _poll(replicate_client, prediction.id)
    assert finished.status == "succeeded"
    with pytest.raises(json.JSONDecodeError):
        json.loads("".join(finished.output))


async def test_replicate_lost_create_response_is_listed(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    fake_replicate.fail_next(Fault.reset())
    with pytest.raises(httpx.ReadError):
        await replicate_client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "a"})
    fake_replicate.fail_next(Fault.malformed())
    with pytest.raises(json.JSONDecodeError):
        await replicate_client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "b"})
    # create() without `wait` sends timeout=None (no timeout at all): only an outer
    # deadline gets the caller out of a hang.
    fake_replicate.fail_next(Fault.hang())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            replicate_client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "c"}),
            0.5,
        )
    assert fake_replicate.created_count == 3
    page = await replicate_client.predictions.async_list()
    assert [p.input for p in page.results] == [{"prompt": "c"}, {"prompt": "b"}, {"prompt": "a"}]
    assert page.next is None
    finished = await _poll(replicate_client, page.results[-1].id)
    assert finished.status == "succeeded"


async def test_replicate_hang_on_get_times_out(fake_replicate: FakeReplicate) -> None:
    client = _make_replicate_client(fake_replicate, timeout=httpx.Timeout(0.5))
    try:
        prediction = await client.predictions.async_create(model=TEXT_MODEL, input={"prompt": "x"})
        fake_replicate.fail_next(Fault.hang(), method="GET")
        with pytest.raises(httpx.ReadTimeout):
            await client.predictions.async_get(prediction.id)
    finally:
        await client._async_client.aclose()


async def test_replicate_cancel_and_not_found(
    fake_replicate: FakeReplicate, replicate_client: ReplicateClient
) -> None:
    prediction = await replicate_client.predictions.async_create(
        model=TEXT_MODEL, input={"prompt": "x"}
    )
    canceled = await replicate_client.predictions.async_cancel(prediction.id)
    assert canceled.status == "canceled"
    assert (await replicate_client.predictions.async_get(prediction.id)).status == "canceled"
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await replicate_client.predictions.async_get("doesnotexist")
    assert caught.value.status == 404
    assert caught.value.title == "Not found"


async def test_replicate_requires_bearer_token(fake_replicate: FakeReplicate) -> None:
    async with httpx.AsyncClient(base_url=fake_replicate.base_url) as http:
        response = await http.get("/v1/predictions")
    assert response.status_code == 401
    assert response.json()["status"] == 401
    assert fake_replicate.count() == 1


def test_text_tokens_round_trip() -> None:
    for text in ["", "a", '{"a": 1}', "  lead and trail  ", "x\n\ny"]:
        assert "".join(text_tokens(text)) == text


# --- FaultProxy with a real Redis -------------------------------------------------------


def _redis_via(proxy: FaultProxy, redis_url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        proxy.url_for(path=urlsplit(redis_url).path or "/0"),
        socket_timeout=0.2,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.mark.redis
async def test_fault_proxy_modes(fault_proxy_redis: FaultProxy, redis_url: str) -> None:
    proxy = fault_proxy_redis
    port = proxy.port
    # The test database's path (REDIS_TEST_URL's), behind the proxy's address.
    assert proxy.url_for() == f"redis://127.0.0.1:{port}{urlsplit(redis_url).path}"
    client = _redis_via(proxy, redis_url)
    try:
        assert await client.ping() is True

        proxy.set_mode("blackhole")
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()

        proxy.set_mode("down")
        with pytest.raises(redis.exceptions.ConnectionError) as refused:
            await client.ping()
        assert not isinstance(refused.value, redis.exceptions.TimeoutError)

        proxy.set_mode("pass")
        assert proxy.port == port
        assert await client.ping() is True

        proxy.set_mode("reset")  # aborts the pooled connection
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        with pytest.raises(redis.exceptions.ConnectionError):  # and new ones
            await client.ping()

        proxy.set_mode("pass")
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_fault_proxy_latency(fault_proxy_redis: FaultProxy, redis_url: str) -> None:
    proxy = fault_proxy_redis
    client = _redis_via(proxy, redis_url)
    try:
        assert await client.ping() is True
        proxy.latency_ms = 60
        proxy.set_mode("latency")
        started = time.monotonic()
        assert await client.ping() is True
        assert time.monotonic() - started >= 0.1  # loose: 60 ms each way
        proxy.latency_ms = 500
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
    finally:
        await client.aclose()
    assert proxy.accepted >= 1


def test_fault_proxy_rejects_unknown_mode() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("flaky")
    proxy.stop()  # never started: no-op
