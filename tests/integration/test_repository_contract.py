"""One contract, two stores: every test here runs on SQLite and on real PostgreSQL."""

from __future__ import annotations

import dataclasses
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from app.db.postgres import PostgresStoryRepository
from app.db.repository import (
    ClaimLostError,
    StoryRepository,
    migration_files,
    migration_versions,
)
from app.models import IdempotencyEntry, StoryRecord

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def story(
    *, owner: str = "alice", age: int = 6, at: datetime = T0, degraded: bool = False
) -> StoryRecord:
    return StoryRecord(
        id=uuid.uuid4(),
        owner=owner,
        title="The Moon Boat",
        paragraphs=("Once upon a time…", "Ünïcödé and émojis 🌙 survive.", "The end."),
        prompt="a boat that sails to the moon",
        age=age,
        length="short",
        language="en",
        provider="openai",
        model="gpt-4o-mini",
        degraded=degraded,
        illustration_url="https://example.test/moon.webp",
        prompt_tokens=12,
        completion_tokens=345,
        generation_ms=678,
        created_at=at,
        illustrate=True,
    )


async def test_a_stored_story_reads_back_field_for_field(repository: StoryRepository) -> None:
    original = story()
    await repository.add(original)

    assert await repository.get(original.id, "alice") == original


@pytest.mark.parametrize("moderated_locally", [True, False, None])
async def test_who_passed_the_story_reads_back(
    repository: StoryRepository, moderated_locally: bool | None
) -> None:
    original = dataclasses.replace(story(), moderated_locally=moderated_locally)
    await repository.add(original)

    found = await repository.get(original.id, "alice")
    assert found is not None
    assert found.moderated_locally is moderated_locally


async def test_a_story_is_invisible_to_other_owners(repository: StoryRepository) -> None:
    original = story(owner="alice")
    await repository.add(original)

    assert await repository.get(original.id, "bob") is None


async def test_an_unknown_id_reads_as_none(repository: StoryRepository) -> None:
    assert await repository.get(uuid.uuid4(), "alice") is None


async def test_the_same_id_cannot_be_stored_twice(repository: StoryRepository) -> None:
    original = story()
    await repository.add(original)

    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await repository.add(original)


async def test_pages_are_newest_first_and_cover_everything_once(
    repository: StoryRepository,
) -> None:
    stories = [story(at=T0 + timedelta(seconds=i)) for i in range(7)]
    # Two stories in the same microsecond: the id breaks the tie, none is lost.
    stories.append(story(at=T0 + timedelta(seconds=3)))
    for s in stories:
        await repository.add(s)
    await repository.add(story(owner="bob"))

    seen: list[StoryRecord] = []
    page = await repository.list_page("alice", 3)
    seen.extend(page.items)
    while page.next_cursor is not None:
        page = await repository.list_page("alice", 3, page.next_cursor)
        seen.extend(page.items)

    assert len(seen) == 8
    assert {s.id for s in seen} == {s.id for s in stories}
    keys = [(s.created_at, str(s.id)) for s in seen]
    assert keys == sorted(keys, reverse=True)


async def test_the_last_page_has_no_cursor(repository: StoryRepository) -> None:
    await repository.add(story())

    page = await repository.list_page("alice", 1)

    assert len(page.items) == 1
    assert page.next_cursor is None


async def test_recommendations_prefer_the_exact_age_and_undegraded_stories(
    repository: StoryRepository,
) -> None:
    exact = story(age=6, at=T0)
    near = story(age=7, at=T0 + timedelta(seconds=1))
    degraded = story(age=6, at=T0 + timedelta(seconds=2), degraded=True)
    far = story(age=10)
    for s in (exact, near, degraded, far):
        await repository.add(s)

    found = await repository.recommend("alice", 6, 10)

    assert [s.id for s in found] == [exact.id, near.id, degraded.id]


async def test_migrating_twice_applies_nothing_the_second_time(
    repository: StoryRepository,
) -> None:
    assert await repository.migrate() == []
    assert "0001_stories" in await repository.applied_migrations()
    assert "0003_stories_illustrate" in await repository.applied_migrations()
    assert "0004_idempotency_claim_token" in await repository.applied_migrations()


async def test_a_migration_that_fails_leaves_nothing_of_itself(
    repository: StoryRepository, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    module = sys.modules[type(repository).__module__]
    shipped = module.migration_files(repository.backend)
    create = "CREATE TABLE half_done (x INTEGER);"
    broken = [*shipped, ("9999_broken", f"{create}\nSELECT * FROM no_such_table;")]
    fixed = [*shipped, ("9999_broken", create)]
    try:
        monkeypatch.setattr(module, "migration_files", lambda backend: broken)
        with pytest.raises(Exception, match="no_such_table"):
            await repository.migrate()
        assert "9999_broken" not in await repository.applied_migrations()

        monkeypatch.setattr(module, "migration_files", lambda backend: fixed)
        # Had the table stayed, creating it again would fail.
        assert await repository.migrate() == ["9999_broken"]
    finally:
        if repository.backend == "postgres":  # the scratch database outlives this test
            conn = await asyncpg.connect(request.getfixturevalue("clean_postgres"))
            try:
                await conn.execute("DELETE FROM schema_migrations WHERE version = '9999_broken'")
                await conn.execute("DROP TABLE IF EXISTS half_done")
            finally:
                await conn.close()


async def test_every_postgres_migration_can_run_again_as_it_is(clean_postgres: str) -> None:
    repo = await PostgresStoryRepository.connect(
        clean_postgres, min_size=1, max_size=1, command_timeout=5, connect_timeout=5
    )
    try:
        await repo.migrate()
    finally:
        await repo.close()
    conn = await asyncpg.connect(clean_postgres)
    try:
        for _, sql in migration_files("postgres"):
            await conn.execute(sql)
    finally:
        await conn.close()


async def test_ping_measures_a_round_trip(repository: StoryRepository) -> None:
    assert await repository.ping() >= 0


async def test_the_applied_migrations_are_the_ones_this_build_ships(
    repository: StoryRepository,
) -> None:
    applied = await repository.applied_migrations()

    assert tuple(applied) == migration_versions(repository.backend)
    assert migration_versions(repository.backend)[0] == "0001_stories"


LEASE = timedelta(seconds=5)
KEEP = timedelta(days=1)


async def claim(
    repository: StoryRepository,
    fingerprint: str,
    *,
    at: datetime = T0,
    key: str = "k",
    token: str = "t1",  # noqa: S107 - a claim token, not a password
) -> IdempotencyEntry | None:
    return await repository.claim_key(
        "alice",
        key,
        fingerprint,
        token=token,
        now=at,
        locked_until=at + LEASE,
        expires_at=at + KEEP,
    )


async def test_a_new_key_is_claimed_and_a_repeat_sees_the_pending_claim(
    repository: StoryRepository,
) -> None:
    assert await claim(repository, "f1") is None

    entry = await claim(repository, "f1", token="t2")

    assert entry is not None
    assert (entry.fingerprint, entry.state, entry.story_id) == ("f1", "pending", None)
    assert entry.locked_until == T0 + LEASE
    assert await repository.read_key("alice", "k") == entry
    assert await repository.read_key("alice", "other") is None


async def test_storing_with_the_claim_marks_the_key_done_with_its_story(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")
    original = story()

    await repository.add(original, idempotency_key="k", claim_token="t1")
    entry = await claim(repository, "f1", at=T0 + LEASE * 2, token="t2")

    assert entry is not None
    assert (entry.state, entry.story_id) == ("done", original.id)
    assert await repository.get(original.id, "alice") == original


async def test_a_renewal_extends_the_lease_and_keeps_the_token(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")
    later = T0 + LEASE * 3

    assert await repository.renew_key("alice", "k", "t1", locked_until=later) is True
    # Past the first lease, but within the renewed one: not taken over.
    entry = await claim(repository, "f1", at=T0 + LEASE * 2, token="t2")
    assert entry is not None
    assert entry.locked_until == later
    original = story()
    await repository.add(original, idempotency_key="k", claim_token="t1")
    assert await repository.get(original.id, "alice") == original


async def test_only_the_holder_renews_and_nothing_renews_a_finished_claim(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")

    assert await repository.renew_key("alice", "k", "t2", locked_until=T0 + LEASE * 9) is False
    assert await repository.renew_key("alice", "nope", "t1", locked_until=T0 + LEASE) is False
    entry = await repository.read_key("alice", "k")
    assert entry is not None
    assert entry.locked_until == T0 + LEASE

    await repository.add(story(), idempotency_key="k", claim_token="t1")
    assert await repository.renew_key("alice", "k", "t1", locked_until=T0 + LEASE * 9) is False


async def test_a_claim_whose_lease_lapsed_is_taken_over_and_its_holder_stores_nothing(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")
    # The holder died: past its lease, the same request takes the key over.
    later = T0 + LEASE + timedelta(seconds=1)
    assert await claim(repository, "f1", at=later, token="t2") is None
    original = story()

    with pytest.raises(ClaimLostError):
        await repository.add(original, idempotency_key="k", claim_token="t1")
    assert await repository.renew_key("alice", "k", "t1", locked_until=later + LEASE) is False

    assert await repository.get(original.id, "alice") is None
    newer = story()
    await repository.add(newer, idempotency_key="k", claim_token="t2")
    assert await repository.get(newer.id, "alice") == newer


async def test_a_lapsed_claim_is_not_taken_over_by_another_body(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")

    entry = await claim(repository, "f2", at=T0 + LEASE * 2, token="t2")

    assert entry is not None
    assert (entry.fingerprint, entry.state) == ("f1", "pending")


async def test_a_claim_taken_over_is_not_released_by_its_former_holder(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")
    assert await claim(repository, "f1", at=T0 + LEASE * 2, token="t2") is None

    await repository.release_key("alice", "k", "t1")

    entry = await repository.read_key("alice", "k")
    assert entry is not None
    assert entry.state == "pending"
    original = story()
    await repository.add(original, idempotency_key="k", claim_token="t2")
    assert await repository.get(original.id, "alice") == original


async def test_a_released_key_can_be_claimed_again_and_expired_keys_are_purged(
    repository: StoryRepository,
) -> None:
    await claim(repository, "f1")
    await repository.release_key("alice", "k", "t1")
    assert await repository.read_key("alice", "k") is None
    assert await claim(repository, "f2", token="t2") is None
    await claim(repository, "f3", key="old", at=T0 - KEEP * 2)

    assert await repository.purge_expired_keys(T0) == 1
    assert await claim(repository, "f4", key="old") is None


async def test_a_done_key_is_not_released(repository: StoryRepository) -> None:
    await claim(repository, "f1")
    original = story()
    await repository.add(original, idempotency_key="k", claim_token="t1")

    await repository.release_key("alice", "k", "t1")

    entry = await repository.read_key("alice", "k")
    assert entry is not None
    assert (entry.state, entry.story_id) == ("done", original.id)


async def test_a_claim_released_between_claiming_and_reading_is_claimed_again(
    repository: StoryRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    await claim(repository, "f1")
    read_entry: Callable[[str, str], Awaitable[IdempotencyEntry | None]]
    read_entry = repository._read_entry  # type: ignore[attr-defined]
    reads = 0

    async def released_first(owner: str, key: str) -> IdempotencyEntry | None:
        nonlocal reads
        reads += 1
        if reads == 1:  # the holder's request fails just now and drops its claim
            await repository.release_key(owner, key, "t1")
        return await read_entry(owner, key)

    monkeypatch.setattr(repository, "_read_entry", released_first)

    assert await claim(repository, "f2", at=T0 + timedelta(seconds=1), token="t2") is None
    assert reads == 1
    monkeypatch.undo()
    entry = await claim(repository, "f3", at=T0 + timedelta(seconds=2), token="t3")
    assert entry is not None
    assert entry.fingerprint == "f2"
