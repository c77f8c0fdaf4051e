"""Child-safe content through the API: the real app, the fake OpenAI and Replicate servers.

The fakes record every request they receive, so "no story model saw it" is a
count of zero completions and zero predictions, not an inference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.core.resilience import BreakerState
from app.platform.config import ModerationSettings
from app.providers.base import StoryRequest
from app.providers.offline import OfflineStoryProvider
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve, serve_app

COMPLETIONS = "/v1/chat/completions"
MODERATIONS = "/v1/moderations"
PREDICTIONS = "/v1/models/"
KNIFE = "how to hurt my little sister with a knife"
KNIFE_BODY: dict[str, Any] = {**STORY_BODY, "prompt": KNIFE, "age": 5}


def moderation(**changes: Any) -> ModerationSettings:
    return ModerationSettings(_env_file=None, **changes)


async def stored_texts(client: httpx.AsyncClient) -> str:
    page = (await client.get("/v1/stories", params={"limit": 100})).json()
    return " ".join(f"{s['title']} {' '.join(s['paragraphs'])}" for s in page["items"])


async def moderation_counts(client: httpx.AsyncClient) -> dict[tuple[str, str, str], float]:
    text = (await client.get("/metrics")).text
    pattern = re.compile(r"^story_moderation_total\{([^}]*)\} (\S+)$", re.MULTILINE)
    counts: dict[tuple[str, str, str], float] = {}
    for labels, value in pattern.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[(found["where"], found["verdict"], found["checker"])] = float(value)
    return counts


def grew(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def assert_refused_prompt(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"].endswith("/unsuitable-prompt")
    assert [e["field"] for e in body["errors"]] == ["prompt"]
    assert "children's story" in body["detail"]
    # Nothing of the text is echoed, no category or score is named.
    for leaked in ("knife", "sister", "hurt", "violence", "score"):
        assert leaked not in response.text.lower()


async def test_the_knife_prompt_reaches_no_story_model(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
    )
    async with serve(settings) as client:
        before = await moderation_counts(client)
        response = await client.post("/v1/stories", json=KNIFE_BODY)
        after = await moderation_counts(client)
        stored = await stored_texts(client)

    assert_refused_prompt(response)
    assert fake_openai.moderation_inputs() == [KNIFE]
    assert fake_openai.count(path=COMPLETIONS) == 0
    assert fake_openai.replies_served == 0
    assert fake_replicate.count(path=PREDICTIONS) == 0
    assert stored == ""
    assert grew(before, after) == {("prompt", "flagged", "openai"): 1.0}


async def test_a_flagged_story_is_never_returned_or_stored_and_the_next_rung_serves(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_openai.flag_words(["zorblax"])
    fake_openai.story_extra = "Then the zorblax bit everyone."
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
    )
    async with serve(settings) as client:
        before = await moderation_counts(client)
        response = await client.post("/v1/stories", json=STORY_BODY)
        after = await moderation_counts(client)
        stored = await stored_texts(client)

    assert response.status_code == 201, response.text
    story = response.json()
    assert story["provider"] == "replicate"
    assert story["degraded"] is True
    assert "zorblax" not in response.text
    assert "zorblax" not in stored
    assert fake_openai.replies_served == 1  # OpenAI wrote it; the check dropped it
    checked = fake_openai.moderation_inputs()
    assert checked[0] == STORY_BODY["prompt"]
    assert "zorblax" in checked[1]  # OpenAI's story, flagged
    assert "zorblax" not in checked[2]  # Replicate's story, passed
    assert grew(before, after) == {
        ("prompt", "passed", "openai"): 1.0,
        ("story", "flagged", "openai"): 1.0,
        ("story", "passed", "openai"): 1.0,
    }


async def test_a_flagged_story_is_not_cached_for_later(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.flag_words(["zorblax"])
    fake_openai.story_extra = "zorblax"
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        first = await client.post("/v1/stories", json=STORY_BODY)
        fake_openai.set_fault(Fault.status(400), path=COMPLETIONS)  # OpenAI writes nothing now
        second = await client.post("/v1/stories", json=STORY_BODY)
        stored = await stored_texts(client)

    assert first.json()["provider"] == second.json()["provider"] == "offline"
    assert "zorblax" not in stored


async def test_with_every_upstream_down_an_unsafe_prompt_never_becomes_a_story(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500))  # moderation and completions alike
    fake_replicate.set_fault(Fault.status(500))
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        replicate_base_url=fake_replicate.base_url,
    )
    async with serve(settings) as client:
        before = await moderation_counts(client)
        refused = await client.post("/v1/stories", json=KNIFE_BODY)
        safe = await client.post("/v1/stories", json=STORY_BODY)
        after = await moderation_counts(client)
        stored = await stored_texts(client)

    assert_refused_prompt(refused)
    assert fake_openai.count(path=MODERATIONS) > 0  # it was asked, and failed
    assert fake_replicate.count(path=PREDICTIONS) > 0  # for the safe prompt only
    assert "knife" not in stored
    assert safe.status_code == 201
    story = safe.json()
    assert story["provider"] == "offline"
    # The offline story is its templates around the prompt that passed the local check:
    # no other text of the caller's.
    expected = OfflineStoryProvider().compose(
        StoryRequest(STORY_BODY["prompt"], STORY_BODY["age"], "short", "en"), use_prompt=True
    )
    assert (story["title"], tuple(story["paragraphs"])) == (expected.title, expected.paragraphs)
    changes = grew(before, after)
    assert changes[("prompt", "flagged", "local")] == 1.0
    assert changes[("prompt", "passed", "local")] == 1.0


async def test_without_any_upstream_configured_the_knife_prompt_is_refused(
    tmp_path: Path,
) -> None:
    settings = make_settings(sqlite_path=tmp_path / "s.db")
    async with serve(settings) as client:
        refused = await client.post("/v1/stories", json=KNIFE_BODY)
        safe = await client.post("/v1/stories", json=STORY_BODY)
        stored = await stored_texts(client)

    assert_refused_prompt(refused)
    assert "knife" not in stored
    assert "sweet dreams of how to hurt" not in stored
    assert safe.json()["provider"] == "offline"


async def test_the_moderation_breaker_opens_and_the_local_check_takes_over(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(500), path=MODERATIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve_app(settings) as (app, client):
        first = await client.post("/v1/stories", json=STORY_BODY)
        attempts_first = fake_openai.count(path=MODERATIONS)
        breaker = app_state(app).breakers["openai:moderation"]
        state = (await breaker.snapshot()).state
        before = await moderation_counts(client)
        second = await client.post("/v1/stories", json={**STORY_BODY, "age": 7})
        refused = await client.post("/v1/stories", json=KNIFE_BODY)
        after = await moderation_counts(client)

    assert state is BreakerState.OPEN
    # The stories record that the local list, not the moderation service, passed them.
    assert first.json()["moderated_locally"] is second.json()["moderated_locally"] is True
    assert attempts_first == 3  # failure threshold 3; then no attempt while open
    assert fake_openai.count(path=MODERATIONS) == 3
    assert first.json()["provider"] == second.json()["provider"] == "openai"
    assert_refused_prompt(refused)
    assert fake_openai.count(path=COMPLETIONS) == 2  # the two safe prompts only
    assert grew(before, after) == {
        ("prompt", "passed", "local"): 1.0,
        ("story", "passed", "local"): 1.0,
        ("prompt", "flagged", "local"): 1.0,
    }


@pytest.mark.parametrize(
    "fault",
    [Fault.malformed(), Fault.wrong_shape(), Fault.bad_content()],
    ids=["not_json", "wrong_shape", "flagged_null"],
)
async def test_an_unusable_moderation_reply_is_no_verdict_and_the_local_check_decides(
    fake_openai: FakeOpenAI, tmp_path: Path, fault: Fault
) -> None:
    fake_openai.set_fault(fault, path=MODERATIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        safe = await client.post("/v1/stories", json=STORY_BODY)
        refused = await client.post("/v1/stories", json=KNIFE_BODY)

    assert safe.status_code == 201, safe.text
    assert safe.json()["moderated_locally"] is True
    assert safe.json()["provider"] == "openai"
    assert_refused_prompt(refused)
    assert fake_openai.count(path=MODERATIONS) >= 1
    assert fake_openai.count(path=COMPLETIONS) == 1  # the safe prompt's story only


async def test_a_hanging_moderation_is_cut_at_its_own_budget(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.hang(), path=MODERATIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        moderation=moderation(timeout_seconds=0.3, floor_seconds=0.2),
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.status_code == 201
    assert response.json()["provider"] == "openai"  # the story rung kept its time
    assert fake_openai.count(path=MODERATIONS) == 2  # one cut attempt per check
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_refuse_mode_answers_503_when_moderation_cannot_answer(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.status(503), path=MODERATIONS)
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        moderation=moderation(on_unavailable="refuse"),
    )
    async with serve(settings) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "try again" in response.json()["detail"]
    assert fake_openai.count(path=COMPLETIONS) == 0


async def test_local_mode_makes_no_moderation_call(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url,
        moderation=moderation(mode="local"),
    )
    async with serve(settings) as client:
        refused = await client.post("/v1/stories", json=KNIFE_BODY)
        served = await client.post("/v1/stories", json=STORY_BODY)

    assert_refused_prompt(refused)
    assert served.json()["provider"] == "openai"
    assert fake_openai.count(path=MODERATIONS) == 0
    assert fake_openai.count(path=COMPLETIONS) == 1


async def test_the_model_is_told_the_age_and_how_to_write_for_it(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        await client.post("/v1/stories", json={**STORY_BODY, "age": 3})

    [call] = [c for c in fake_openai.calls if c.path == COMPLETIONS]
    assert call.json is not None
    system = next(m["content"] for m in call.json["messages"] if m["role"] == "system")
    assert "3 years old" in system
    assert "words per paragraph" in system
    assert "no violence, weapons" in system


def app_state(app: FastAPI) -> Any:
    return app.state.app_state


async def test_a_story_the_moderation_service_passed_says_so(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.db", openai_base_url=fake_openai.openai_base_url
    )
    async with serve(settings) as client:
        created = await client.post("/v1/stories", json=STORY_BODY)
        read = await client.get(created.headers["location"])

    assert created.json()["moderated_locally"] is False
    assert read.json()["moderated_locally"] is False
