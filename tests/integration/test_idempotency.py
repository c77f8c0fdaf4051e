"""Idempotency-Key on POST /v1/stories: phones retry, stories and upstream calls do not double."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.db.postgres import PostgresStoryRepository
from app.db.repository import StorageUnavailableError, StoryRepository
from app.db.sqlite import SqliteStoryRepository
from app.errors import ConflictError
from app.models import StoryRecord
from app.platform.config import Settings
from app.providers.base import StoryRequest
from app.services.idempotency import IdempotencyKeys, IdempotencyPolicy, request_fingerprint
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


async def test_a_claim_left_by_a_dead_worker_is_taken_over_once_its_lease_lapsed(
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

    repo = await PostgresStoryRepository.connect(
        clean_postgres, min_size=1, max_size=1, command_timeout=5, connect_timeout=5
    )
    try:
        await repo.migrate()
        now = datetime.now(UTC)
        await repo.claim_key(
            "o",
            "old",
            "f",
            token="t1",
            now=now,
            locked_until=now,
            expires_at=now - timedelta(seconds=1),
        )
        await repo.claim_key(
            "o",
            "new",
            "f",
            token="t2",
            now=now,
            locked_until=now,
            expires_at=now + timedelta(hours=1),
        )
        purged = await repo.purge_expired_keys(now)
        remaining = await repo.claim_key(
            "o", "new", "other", token="t3", now=now, locked_until=now, expires_at=now
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


async def test_a_request_that_outlives_its_lease_stores_nothing_and_gets_409(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.errors import ConflictError
    from app.platform.config import OpenAISettings
    from app.providers.offline import OfflineStoryProvider
    from app.providers.openai import OpenAIStoryProvider
    from app.services.idempotency import IdempotencyPolicy
    from app.services.stories import StoryService

    fake_openai.fail_next(Fault.delay(0.6), path=COMPLETIONS)
    repository = await SqliteStoryRepository.open(tmp_path / "claims.sqlite3")
    await repository.migrate()
    # The slow request cannot renew its lease (as when its database connection fails).
    monkeypatch.setattr(repository, "renew_key", failing_renewal)
    provider = OpenAIStoryProvider.from_settings(
        OpenAISettings(_env_file=None, api_key="sk-test", base_url=fake_openai.openai_base_url)
    )
    service = StoryService(
        repository,
        [provider],
        offline=OfflineStoryProvider(),
        idempotency=IdempotencyPolicy(lease_seconds=0.2, wait_seconds=0),
    )
    request = StoryRequest(prompt="a slow snail", age=5, length="short", language="en")
    try:
        slow = asyncio.create_task(
            service.create("anonymous", request, illustrate=False, idempotency_key="k")
        )
        await asyncio.sleep(0.35)  # the slow request's lease has lapsed
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
    assert fake_openai.count(path=COMPLETIONS) == 2


async def test_a_slow_first_request_keeps_its_key_while_a_repeat_waits(
    settings_for: SettingsFactory, fake_openai: FakeOpenAI
) -> None:
    # The first request outlasts its lease several times over; its heartbeat keeps it.
    fake_openai.set_fault(Fault.delay(2.0), path=COMPLETIONS)
    settings = settings_for(
        openai_base_url=fake_openai.openai_base_url, idempotency_lease_seconds=0.5
    )
    headers = {"Idempotency-Key": "slow-but-alive"}
    async with serve(settings) as client:
        first = asyncio.create_task(client.post("/v1/stories", json=STORY_BODY, headers=headers))
        await asyncio.sleep(1.2)
        repeat = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        finished = await first

    assert finished.status_code == repeat.status_code == 201
    assert repeat.json()["id"] == finished.json()["id"]
    assert repeat.headers["idempotent-replayed"] == "true"
    assert fake_openai.count(path=COMPLETIONS) == 1


def test_the_lease_setting_defaults_to_five_seconds_and_must_be_positive() -> None:
    from pydantic import ValidationError

    assert make_settings().idempotency_lease_seconds == 5.0
    assert make_settings(idempotency_lease_seconds=0.5).idempotency_lease_seconds == 0.5
    for wrong in (0, -1):
        with pytest.raises(ValidationError, match="idempotency_lease_seconds"):
            make_settings(idempotency_lease_seconds=wrong)


def test_a_waiting_repeat_pauses_with_full_jitter_growing_to_the_cap() -> None:
    policy = IdempotencyPolicy(poll_first_seconds=0.05, poll_max_seconds=1.0)

    for reads in range(12):
        ceiling = min(1.0, 0.05 * 2**reads)
        pauses = [policy.poll_pause(reads) for _ in range(400)]
        assert all(0 <= pause <= ceiling for pause in pauses)
        assert max(pauses) > 0.8 * ceiling  # spread over the whole range: full jitter
    assert policy.poll_pause(10_000) <= 1.0
    for wrong in ({"lease_seconds": 0}, {"poll_first_seconds": 0}, {"poll_first_seconds": 2.0}):
        with pytest.raises(ValueError, match=r"must be|need"):
            IdempotencyPolicy(**wrong)


# --- IdempotencyKeys on its own: the lease, its heartbeat, the wait ---------------------


async def failing_renewal(owner: str, key: str, token: str, *, locked_until: datetime) -> bool:
    raise StorageUnavailableError("renew_key: the database did not answer (injected)")


class Writer:
    """A `create` for IdempotencyKeys: takes `seconds`, then stores a story under its claim."""

    def __init__(
        self, repository: StoryRepository, key: str, *, seconds: float, fail: bool = False
    ) -> None:
        self.repository = repository
        self.key = key
        self.seconds = seconds
        self.fail = fail
        self.tokens: list[str] = []

    async def __call__(self, token: str) -> StoryRecord:
        self.tokens.append(token)
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("the upstream failed (injected)")
        story = StoryRecord(
            id=uuid.uuid4(),
            owner="anonymous",
            title="The Snail",
            paragraphs=("Slowly.",),
            prompt="a slow snail",
            age=5,
            length="short",
            language="en",
            provider="openai",
            model="fake",
            degraded=False,
            illustration_url=None,
            prompt_tokens=1,
            completion_tokens=1,
            generation_ms=1,
            created_at=datetime.now(UTC),
        )
        await self.repository.add(story, idempotency_key=self.key, claim_token=token)
        return story


def count_calls(
    monkeypatch: pytest.MonkeyPatch, repository: StoryRepository, name: str
) -> list[float]:
    """Records when `repository.<name>` is called (loop time), calling through."""
    calls: list[float] = []
    method = getattr(repository, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(asyncio.get_running_loop().time())
        return await method(*args, **kwargs)

    monkeypatch.setattr(repository, name, counted)
    return calls


def lease_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith("idempotency-lease:") and not task.done()
    ]


async def test_a_heartbeat_keeps_a_slow_claim_and_the_repeat_gets_its_story(
    repository: StoryRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    renewals = count_calls(monkeypatch, repository, "renew_key")
    keys = IdempotencyKeys(repository, IdempotencyPolicy(lease_seconds=0.4, wait_seconds=3))
    first_writer = Writer(repository, "k", seconds=1.6)  # four leases long
    repeat_writer = Writer(repository, "k", seconds=0)

    first = asyncio.create_task(
        keys.create_once("anonymous", "k", "f", time_left=30, create=first_writer)
    )
    await asyncio.sleep(0.9)
    repeat = await keys.create_once("anonymous", "k", "f", time_left=30, create=repeat_writer)
    made = await first

    assert (made.replayed, repeat.replayed) == (False, True)
    assert repeat.story.id == made.story.id
    assert repeat_writer.tokens == []
    assert len(renewals) >= 3


async def test_renewal_failures_alone_do_not_fail_the_request(
    repository: StoryRepository,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(repository, "renew_key", failing_renewal)
    keys = IdempotencyKeys(repository, IdempotencyPolicy(lease_seconds=0.1))

    with caplog.at_level(logging.WARNING, logger="app.services.idempotency"):
        made = await keys.create_once(
            "anonymous", "k", "f", time_left=30, create=Writer(repository, "k", seconds=0.5)
        )

    assert made.replayed is False
    assert await repository.get(made.story.id, "anonymous") == made.story
    assert any("could not renew" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("outcome", ["stored", "failed", "cancelled"])
async def test_the_heartbeat_stops_with_its_request(
    repository: StoryRepository, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    renewals = count_calls(monkeypatch, repository, "renew_key")
    keys = IdempotencyKeys(repository, IdempotencyPolicy(lease_seconds=0.15))
    writer = Writer(repository, "k", seconds=0.4, fail=outcome == "failed")
    request = asyncio.create_task(
        keys.create_once("anonymous", "k", "f", time_left=30, create=writer)
    )
    if outcome == "cancelled":
        await asyncio.sleep(0.2)
        request.cancel()
    with contextlib.suppress(RuntimeError, asyncio.CancelledError):
        await request
    ended = len(renewals)
    await asyncio.sleep(0.3)  # six renewal intervals

    assert renewals  # it did beat while the request ran
    assert len(renewals) == ended
    assert lease_tasks() == []
    entry = await repository.read_key("anonymous", "k")
    if outcome == "stored":
        assert entry is not None
        assert entry.state == "done"
    else:  # released at once, for the phone's retry
        assert entry is None


async def test_a_waiting_repeat_reads_the_key_with_backoff_not_every_50_ms(
    repository: StoryRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = IdempotencyKeys(repository, IdempotencyPolicy(lease_seconds=5, wait_seconds=2))
    first = asyncio.create_task(
        keys.create_once(
            "anonymous", "k", "f", time_left=30, create=Writer(repository, "k", seconds=2.5)
        )
    )
    await asyncio.sleep(0.1)
    reads = count_calls(monkeypatch, repository, "read_key")
    claims = count_calls(monkeypatch, repository, "claim_key")

    with pytest.raises(ConflictError):
        await keys.create_once(
            "anonymous", "k", "f", time_left=30, create=Writer(repository, "k", seconds=0)
        )
    await first

    # Polling every 50 ms would be 40 rounds of a claim and a read. Backoff with
    # full jitter: about 9 reads in 2 s; more than 20 is vanishingly unlikely.
    assert len(claims) == 1
    assert 3 <= len(reads) <= 20


async def test_a_waiting_repeat_takes_over_once_the_lease_of_a_dead_holder_lapsed(
    repository: StoryRepository,
) -> None:
    now = datetime.now(UTC)
    # A holder that died just now: its lease runs for another 0.3 s and is never renewed.
    await repository.claim_key(
        "anonymous",
        "k",
        "f",
        token="dead",
        now=now,
        locked_until=now + timedelta(seconds=0.3),
        expires_at=now + timedelta(days=1),
    )
    keys = IdempotencyKeys(repository, IdempotencyPolicy(wait_seconds=5))
    writer = Writer(repository, "k", seconds=0)

    made = await keys.create_once("anonymous", "k", "f", time_left=30, create=writer)

    assert made.replayed is False
    assert len(writer.tokens) == 1
    assert writer.tokens[0] != "dead"
    entry = await repository.read_key("anonymous", "k")
    assert entry is not None
    assert (entry.state, entry.story_id) == ("done", made.story.id)
