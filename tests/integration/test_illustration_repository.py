"""The picture's part of the repository contract (lease, outcome, sweep, delete), on both stores."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import aiosqlite

from app.db.repository import StoryRepository, migration_files
from app.db.sqlite import SqliteStoryRepository
from app.models import StoredIllustration, StoryRecord
from tests.integration.test_repository_contract import T0, story

LEASE = timedelta(seconds=30)
READY = StoredIllustration(
    status="ready",
    key="illustrations/x/abc.webp",
    media_type="image/webp",
    size_bytes=1234,
    width=64,
    height=48,
    sha256="ab" * 32,
)


async def pending_story(repository: StoryRepository) -> StoryRecord:
    record = dataclasses.replace(story(), illustration=StoredIllustration(status="pending"))
    await repository.add(record)
    return record


async def test_a_pending_picture_is_held_by_one_claim_at_a_time(
    repository: StoryRepository,
) -> None:
    record = await pending_story(repository)

    first = await repository.claim_illustration(
        record.id, token="a", now=T0, locked_until=T0 + LEASE, max_attempts=3
    )
    second = await repository.claim_illustration(
        record.id, token="b", now=T0 + LEASE / 2, locked_until=T0 + LEASE, max_attempts=3
    )

    assert first is not None
    assert first.illustration == StoredIllustration(status="pending", attempts=1)
    assert second is None
    assert await repository.renew_illustration(record.id, "a", T0 + 2 * LEASE)
    assert not await repository.renew_illustration(record.id, "b", T0 + 2 * LEASE)
    assert await repository.pending_illustrations(T0 + LEASE, 10) == []


async def test_a_lapsed_lease_is_taken_over_and_the_old_holder_changes_nothing(
    repository: StoryRepository,
) -> None:
    record = await pending_story(repository)
    await repository.claim_illustration(
        record.id, token="dead", now=T0, locked_until=T0 + LEASE, max_attempts=3
    )
    later = T0 + 2 * LEASE

    assert await repository.pending_illustrations(later, 10) == [record.id]
    taken = await repository.claim_illustration(
        record.id, token="alive", now=later, locked_until=later + LEASE, max_attempts=3
    )
    assert taken is not None
    assert taken.illustration is not None
    assert taken.illustration.attempts == 2
    assert not await repository.settle_illustration(record.id, "dead", READY)
    assert await repository.settle_illustration(record.id, "alive", READY)

    found = await repository.get(record.id, "alice")
    assert found is not None
    assert found.illustration == dataclasses.replace(READY, attempts=2)  # attempts are kept
    assert (
        await repository.claim_illustration(
            record.id, token="c", now=later, locked_until=later + LEASE, max_attempts=3
        )
        is None
    )


async def test_a_picture_handed_back_waits_for_its_retry_time(
    repository: StoryRepository,
) -> None:
    record = await pending_story(repository)
    await repository.claim_illustration(
        record.id, token="a", now=T0, locked_until=T0 + LEASE, max_attempts=3
    )
    again = StoredIllustration(status="pending", attempts=1, error="upstream down")

    assert await repository.settle_illustration(record.id, "a", again, retry_at=T0 + LEASE)

    assert await repository.pending_illustrations(T0 + LEASE / 2, 10) == []
    assert await repository.pending_illustrations(T0 + 2 * LEASE, 10) == [record.id]
    found = await repository.get(record.id, "alice")
    assert found is not None
    assert found.illustration == again


async def test_a_picture_tried_too_often_is_given_up_once_nobody_holds_it(
    repository: StoryRepository,
) -> None:
    record = await pending_story(repository)
    await repository.claim_illustration(
        record.id, token="a", now=T0, locked_until=T0 + LEASE, max_attempts=1
    )

    assert await repository.give_up_illustrations(T0 + LEASE / 2, 1) == 0  # still held
    assert (
        await repository.claim_illustration(
            record.id, token="b", now=T0 + 2 * LEASE, locked_until=T0 + 3 * LEASE, max_attempts=1
        )
        is None
    )
    assert await repository.give_up_illustrations(T0 + 2 * LEASE, 1) == 1

    found = await repository.get(record.id, "alice")
    assert found is not None
    assert found.illustration is not None
    assert found.illustration.status == "failed"
    assert found.illustration.error == "gave up after 1 attempts"
    assert await repository.pending_illustrations(T0 + 4 * LEASE, 10) == []


async def test_deleting_a_story_returns_it_and_only_its_owner_can(
    repository: StoryRepository,
) -> None:
    record = dataclasses.replace(story(), illustration=READY)
    await repository.add(record)

    assert await repository.delete(record.id, "bob") is None
    deleted = await repository.delete(record.id, "alice")

    assert deleted == record
    assert await repository.get(record.id, "alice") is None
    assert await repository.delete(record.id, "alice") is None


async def test_pictures_illustrated_before_are_marked_failed_by_the_migration(
    tmp_path: Path,
) -> None:
    # A database at 0005 holding stories from before: one whose upstream URL has
    # died, one whose picture could not be drawn, one that asked for none.
    conn = await aiosqlite.connect(tmp_path / "old.sqlite3")
    await conn.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT)")
    for version, sql in migration_files("sqlite")[:5]:
        await conn.executescript(sql)
        await conn.execute("INSERT INTO schema_migrations VALUES (?, '')", (version,))
    for n, (url, illustrate) in enumerate(
        [("https://replicate.delivery/x.webp", 1), (None, 1), (None, 0)]
    ):
        await conn.execute(
            "INSERT INTO stories (id, owner, title, paragraphs, prompt, age, length, language, "
            "provider, model, degraded, illustration_url, created_at, illustrate) VALUES "
            "(?, 'alice', 't', '[\"p\"]', 'p', 6, 'short', 'en', 'openai', 'm', 0, ?, ?, ?)",
            (f"00000000-0000-0000-0000-00000000000{n}", url, T0.isoformat(), illustrate),
        )
    await conn.commit()
    conn.row_factory = aiosqlite.Row
    repository = SqliteStoryRepository(conn)
    try:
        applied = await repository.migrate()
        assert applied[0] == "0006_stories_illustrations"  # and any later ones
        found = [
            await repository.get(UUID(f"00000000-0000-0000-0000-00000000000{n}"), "alice")
            for n in range(3)
        ]
    finally:
        await repository.close()

    pictures = [story.illustration if story else "missing" for story in found]
    assert pictures == [
        StoredIllustration(status="failed", error="upstream link expired"),
        StoredIllustration(status="failed", error="not drawn"),
        None,
    ]
