"""The daily story quota, per principal, counted in the database, on both stores.

Two principals with real signed tokens: one spends its quota and gets a 429
problem with `Retry-After` until midnight UTC, before any upstream is paid (the
fake OpenAI counts the calls); the other is unaffected; a repeat of a story
already created (same `Idempotency-Key`) is still answered and counts nothing.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from app.db.repository import StoryRepository
from app.errors import QuotaExceededError
from app.services.quota import DailyQuota, utc_midnight
from tests.fakes.openai_fake import FakeOpenAI
from tests.integration.test_auth_api import SettingsFactory, as_
from tests.integration.test_repository_contract import story
from tests.support import STORY_BODY, serve

COMPLETIONS = "/v1/chat/completions"


def with_key(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


async def test_a_spent_quota_is_a_429_until_midnight_and_pays_nothing(
    settings_for: SettingsFactory, fake_openai: FakeOpenAI
) -> None:
    # Tokens minted now: the module-level ones expire 5 minutes after collection.
    alice, bob = as_("alice"), as_("bob")
    settings = settings_for(story_daily_quota=2, openai_base_url=fake_openai.openai_base_url)
    async with serve(settings) as client:
        first = await client.post("/v1/stories", json=STORY_BODY, headers=with_key(alice, "k1"))
        second = await client.post("/v1/stories", json=STORY_BODY, headers=alice)
        paid = fake_openai.count(path=COMPLETIONS)
        asked = datetime.now(UTC)  # the header counts from when the server answered, later
        refused = await client.post("/v1/stories", json=STORY_BODY, headers=alice)
        paid_after_refusal = fake_openai.count(path=COMPLETIONS)
        repeat = await client.post("/v1/stories", json=STORY_BODY, headers=with_key(alice, "k1"))
        bob = await client.post("/v1/stories", json=STORY_BODY, headers=bob)
        listed = await client.get("/v1/stories", headers=alice)

    assert [first.status_code, second.status_code] == [201, 201]
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("/quota-exceeded")
    until_midnight = (utc_midnight(asked) + timedelta(days=1) - asked).total_seconds()
    assert 0 < int(refused.headers["retry-after"]) <= math.ceil(until_midnight)
    assert paid_after_refusal == paid  # nothing paid for the refused one
    assert repeat.status_code == 201  # the first story again, nothing new
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json()["id"] == first.json()["id"]
    assert bob.status_code == 201  # another principal's quota
    assert len(listed.json()["items"]) == 2


async def test_yesterdays_stories_do_not_count(repository: StoryRepository) -> None:
    now = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    await repository.add(story(owner="alice", at=now - timedelta(hours=10)))
    await repository.add(story(owner="alice", at=now - timedelta(hours=1)))
    await repository.add(story(owner="bob", at=now - timedelta(hours=1)))
    quota = DailyQuota(repository, 2, now=lambda: now)

    assert await repository.count_created_since("alice", utc_midnight(now)) == 1
    await quota.check("alice")  # 1 of 2 today
    await repository.add(story(owner="alice", at=now))
    with pytest.raises(QuotaExceededError):
        await quota.check("alice")
    await DailyQuota(repository, 2, exempt=frozenset({"alice"}), now=lambda: now).check("alice")
    await DailyQuota(repository, 0, now=lambda: now).check("alice")  # 0: no quota
