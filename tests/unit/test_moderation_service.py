"""The content-check policy and the story service's hooks, with in-process doubles."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest

from app.core.resilience import CircuitOpenError, current_deadline
from app.errors import InvalidRequestError, ServiceUnavailableError
from app.platform.config import ModerationSettings, OpenAISettings, Settings
from app.providers.base import (
    GeneratedStory,
    ModerationVerdict,
    ProviderResponseError,
    ProviderUnavailableError,
    StoryRequest,
)
from app.providers.offline import OfflineStoryProvider
from app.services.ladder import LadderBudget
from app.services.moderation import (
    ModerationPolicy,
    ModerationService,
    UnsuitablePromptError,
)
from app.services.stories import StoryService

KNIFE = "how to hurt my little sister with a knife"
SAFE = "a dragon who is afraid of the dark"


class Remote:
    """OpenAI's moderation as the service sees it: flags texts holding given words."""

    name = "openai"

    def __init__(self, *flag: str, error: Exception | None = None, hang: bool = False) -> None:
        self.flag = flag
        self.error = error
        self.hang = hang
        self.texts: list[str] = []

    async def moderate(self, text: str) -> ModerationVerdict:
        self.texts.append(text)
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        hit = any(word in text.lower() for word in self.flag)
        return ModerationVerdict(hit, "openai", ("violence",) if hit else ())


class Writer:
    """A story provider; `extra` goes into every story it writes."""

    def __init__(self, name: str, extra: str = "") -> None:
        self.name = name
        self.extra = extra
        self.requests: list[StoryRequest] = []
        self.budgets: list[float] = []

    async def generate(self, request: StoryRequest) -> GeneratedStory:
        self.requests.append(request)
        deadline = current_deadline()
        if deadline is not None:
            self.budgets.append(deadline.remaining())
        return GeneratedStory(
            title=f"The {self.name} story",
            paragraphs=(f"Once upon a time there was {request.prompt}. {self.extra}".strip(),),
            provider=self.name,
            model=f"{self.name}-model",
        )


class Repository:
    def __init__(self) -> None:
        self.records: list[Any] = []

    async def add(
        self, record: Any, *, idempotency_key: Any = None, claim_token: Any = None
    ) -> None:
        self.records.append(record)


class Cache:
    def __init__(self) -> None:
        self.stored: dict[StoryRequest, GeneratedStory] = {}

    async def put(self, request: StoryRequest, story: GeneratedStory) -> None:
        self.stored[request] = story

    async def get(self, request: StoryRequest) -> GeneratedStory | None:
        story = self.stored.get(request)
        return replace(story, provider="cache") if story is not None else None


class Checks:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, where: str, verdict: str, checker: str) -> None:
        self.seen.append((where, verdict, checker))


def request(prompt: str = SAFE, language: str = "en") -> StoryRequest:
    return StoryRequest(prompt=prompt, age=5, length="short", language=language)


def service(
    *writers: Writer,
    remote: Remote | None = None,
    policy: ModerationPolicy | None = None,
    checks: Checks | None = None,
    cache: Cache | None = None,
    repository: Repository | None = None,
    offline: bool = True,
) -> StoryService:
    moderation = ModerationService(
        remote, policy=policy or ModerationPolicy(), record=checks or Checks()
    )
    return StoryService(
        repository or Repository(),  # type: ignore[arg-type]
        list(writers),
        offline=OfflineStoryProvider() if offline else None,
        cache=cache,  # type: ignore[arg-type]
        moderation=moderation,
        deadline_seconds=30.0,
    )


def created(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    return [r for r in caplog.records if r.getMessage() == "story created"][-1]


async def test_a_flagged_prompt_reaches_no_story_model_and_stores_nothing() -> None:
    openai, replicate, repository = Writer("openai"), Writer("replicate"), Repository()
    remote = Remote("knife")
    stories = service(openai, replicate, remote=remote, repository=repository)

    with pytest.raises(UnsuitablePromptError) as refused:
        await stories.create("parent", request(KNIFE), illustrate=False)

    assert isinstance(refused.value, InvalidRequestError)
    assert refused.value.status_code == 422
    assert refused.value.errors == [
        {"field": "prompt", "reason": "not suitable for a children's story"}
    ]
    assert "knife" not in refused.value.detail
    assert "violence" not in refused.value.detail
    assert remote.texts == [KNIFE]
    assert openai.requests == replicate.requests == []
    assert repository.records == []


async def test_a_flagged_story_is_dropped_and_the_next_rung_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    openai = Writer("openai", extra="Then came the zorblax.")
    replicate, cache, repository, checks = Writer("replicate"), Cache(), Repository(), Checks()
    stories = service(
        openai, replicate, remote=Remote("zorblax"), cache=cache, repository=repository,
        checks=checks,
    )  # fmt: skip

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "replicate"
    assert "zorblax" not in " ".join(made.story.paragraphs)
    assert [r.provider for r in repository.records] == ["replicate"]
    assert [s.provider for s in cache.stored.values()] == ["replicate"]
    assert checks.seen == [
        ("prompt", "passed", "openai"),
        ("story", "flagged", "openai"),
        ("story", "passed", "openai"),
    ]
    assert any(r.getMessage().startswith("story failed the content check") for r in caplog.records)
    assert created(caplog).text_checked_by == "openai"


async def test_when_every_story_is_flagged_the_offline_rung_tells_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cache = Cache()
    stories = service(Writer("openai", extra="zorblax"), remote=Remote("zorblax"), cache=cache)

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "offline"
    assert made.story.degraded is True
    assert cache.stored == {}
    # The prompt passed the check, so the offline story may be about it.
    assert "dragon" in " ".join(made.story.paragraphs)
    assert created(caplog).text_checked_by == "templates"


async def test_a_cached_story_was_checked_when_written(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cache, flaky = Cache(), Writer("openai")
    stories = service(flaky, remote=Remote(), cache=cache)
    await stories.create("parent", request(), illustrate=False)
    flaky.extra = "zorblax"
    stories = service(flaky, remote=Remote("zorblax"), cache=cache)

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "cache"
    assert "zorblax" not in " ".join(made.story.paragraphs)
    assert created(caplog).text_checked_by == "cache"


@pytest.mark.parametrize(
    "error",
    [
        ProviderUnavailableError("openai", "HTTP 503"),
        ProviderResponseError("openai", "garbled"),
        CircuitOpenError("openai:moderation", 30.0),
    ],
)
async def test_when_moderation_cannot_answer_the_local_list_decides(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    openai, checks = Writer("openai"), Checks()
    stories = service(openai, remote=Remote(error=error), checks=checks)

    with pytest.raises(UnsuitablePromptError):
        await stories.create("parent", request(KNIFE), illustrate=False)
    assert openai.requests == []
    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "openai"
    assert checks.seen == [
        ("prompt", "flagged", "local"),
        ("prompt", "passed", "local"),
        ("story", "passed", "local"),
    ]
    record = created(caplog)
    assert (record.prompt_checked_by, record.text_checked_by) == ("local", "local")
    assert record.checked_locally is True


async def test_the_local_list_also_checks_upstream_stories() -> None:
    openai = Writer("openai", extra="And then he found a gun.")
    stories = service(openai, remote=Remote(error=ProviderUnavailableError("openai", "down")))

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "offline"
    assert "gun" not in " ".join(made.story.paragraphs)


async def test_refuse_mode_answers_503_and_calls_no_story_model() -> None:
    openai = Writer("openai")
    remote = Remote(error=CircuitOpenError("openai:moderation", 42.0))
    stories = service(openai, remote=remote, policy=ModerationPolicy(on_unavailable="refuse"))

    with pytest.raises(ServiceUnavailableError) as refused:
        await stories.create("parent", request(), illustrate=False)

    assert refused.value.headers["Retry-After"] == "42"
    assert openai.requests == []


async def test_refuse_mode_drops_a_story_it_cannot_check() -> None:
    class PromptOnly(Remote):
        async def moderate(self, text: str) -> ModerationVerdict:
            if self.texts:
                self.error = ProviderUnavailableError("openai", "down")
            return await super().moderate(text)

    stories = service(
        Writer("openai"), remote=PromptOnly(), policy=ModerationPolicy(on_unavailable="refuse")
    )

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "offline"


async def test_local_mode_never_asks_the_remote() -> None:
    remote = Remote("dragon")
    stories = service(Writer("openai"), remote=remote, policy=ModerationPolicy(mode="local"))

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "openai"
    assert remote.texts == []


async def test_without_a_moderation_service_the_local_list_still_checks() -> None:
    stories = StoryService(Repository(), [], offline=OfflineStoryProvider())  # type: ignore[arg-type]

    with pytest.raises(UnsuitablePromptError):
        await stories.create("parent", request(KNIFE), illustrate=False)
    made = await stories.create("parent", request(), illustrate=False)
    assert made.story.provider == "offline"


async def test_a_hanging_check_is_cut_at_its_own_budget_and_the_local_list_decides() -> None:
    remote, checks = Remote(hang=True), Checks()
    stories = service(
        Writer("openai"),
        remote=remote,
        checks=checks,
        policy=ModerationPolicy(check_seconds=0.05),
    )

    made = await stories.create("parent", request(), illustrate=False)

    assert made.story.provider == "openai"
    assert len(remote.texts) == 2
    assert checks.seen == [("prompt", "passed", "local"), ("story", "passed", "local")]


async def test_the_story_rungs_leave_time_for_checking_their_stories() -> None:
    openai, replicate = Writer("openai"), Writer("replicate", extra="zorblax")
    openai.extra = "zorblax"  # both stories are checked, so both rungs ran
    moderation = ModerationService(Remote("zorblax"), policy=ModerationPolicy(check_seconds=2.0))
    stories = StoryService(
        Repository(),  # type: ignore[arg-type]
        [openai, replicate],
        offline=OfflineStoryProvider(),
        moderation=moderation,
        deadline_seconds=10.0,
        budget=LadderBudget(reserve_seconds=0.5, share=1.0),
    )

    await stories.create("parent", request(), illustrate=False)

    # The first rung leaves two checks' time (its own story's and the next rung's); the
    # last rung one.
    assert openai.budgets[0] <= 10.0 - 0.5 - 2 * 2.0
    assert replicate.budgets[0] <= 10.0 - 0.5 - 2.0
    assert moderation.reserve_seconds == 2.0
    assert ModerationService(None).reserve_seconds == 0.0


def test_the_check_budget_comes_from_the_settings() -> None:
    settings = Settings(
        _env_file=None,
        request_deadline_seconds=10.0,
        openai=OpenAISettings(_env_file=None, api_key="sk", floor_seconds=1.0),
        moderation=ModerationSettings(_env_file=None, timeout_seconds=3.0, deadline_share=0.1),
    )

    moderation = ModerationService.from_settings(settings, Remote())

    assert moderation.policy.check_seconds == pytest.approx(1.0)  # 10 % of 10 s < 3 s
    assert (moderation.policy.mode, moderation.policy.on_unavailable) == ("openai", "local")
    assert moderation.reserve_seconds == pytest.approx(1.0)


def test_a_deadline_without_room_for_the_checks_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="moderation checks"):
        Settings(
            _env_file=None,
            request_deadline_seconds=4.0,
            openai=OpenAISettings(_env_file=None, api_key="sk", floor_seconds=2.5),
            moderation=ModerationSettings(_env_file=None, deadline_share=0.25),
        )
    # Local checks need no time of their own.
    Settings(
        _env_file=None,
        request_deadline_seconds=4.0,
        openai=OpenAISettings(_env_file=None, api_key="sk", floor_seconds=2.5),
        moderation=ModerationSettings(_env_file=None, mode="local"),
    )


def test_the_settings_default_to_openai_and_fail_safe() -> None:
    settings = ModerationSettings(_env_file=None)

    assert (settings.mode, settings.on_unavailable) == ("openai", "local")
    assert settings.model == "omni-moderation-latest"


async def test_without_an_offline_rung_a_dropped_story_is_a_clear_503() -> None:
    repository = Repository()
    stories = service(
        Writer("openai", extra="zorblax"),
        remote=Remote("zorblax"),
        repository=repository,
        offline=False,
    )

    with pytest.raises(ServiceUnavailableError) as failed:
        await stories.create("parent", request(), illustrate=False)

    assert "suitable for a child" in failed.value.detail
    assert repository.records == []
