"""One contract, two stores: every test here runs on SQLite and on real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.db.repository import PostgresStoryRepository, SqliteStoryRepository, StoryRepository
from app.models import StoryRecord

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
async def repository(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoryRepository]:
    repo: StoryRepository
    if request.param == "postgres":
        url: str = request.getfixturevalue("clean_postgres")
        repo = await PostgresStoryRepository.connect(
            url, min_size=1, max_size=2, command_timeout=5, connect_timeout=5
        )
    else:
        repo = await SqliteStoryRepository.open(tmp_path / "contract.sqlite3")
    await repo.migrate()
    try:
        yield repo
    finally:
        await repo.close()


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


async def test_ping_measures_a_round_trip(repository: StoryRepository) -> None:
    assert await repository.ping() >= 0
