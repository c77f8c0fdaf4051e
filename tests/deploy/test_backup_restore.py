"""scripts/backup.sh and scripts/restore.sh against a real PostgreSQL.

The source is the session's scratch database (`postgres_url`), migrated and
filled through the app's own repository; each restore goes into a second scratch
database created and dropped by the test. "Equal" means every table of the
public schema holds the same rows and the same indexes exist. Each script run
is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
import yaml

from app.db.postgres import PostgresStoryRepository
from app.models import StoryRecord
from tests.conftest import IN_CI
from tests.support import ROOT

pytestmark = pytest.mark.postgres

BACKUP = ROOT / "scripts" / "backup.sh"
RESTORE = ROOT / "scripts" / "restore.sh"
SCRIPT_TIMEOUT = 120
DAY = 24 * 3600


@pytest.fixture(scope="module", autouse=True)
def postgres_client_tools() -> None:
    missing = [tool for tool in ("pg_dump", "pg_restore", "psql") if shutil.which(tool) is None]
    if missing:
        reason = f"PostgreSQL client tools not on PATH: {', '.join(missing)}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: these tests must run)")
        pytest.skip(reason)


def _database_url(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _story(title: str, age: int, created_at: datetime) -> StoryRecord:
    return StoryRecord(
        id=uuid4(),
        owner="backup-test",
        title=title,
        paragraphs=("Once upon a time, 'quotes' and \"doubles\".", "Ünïcödé, tabs\tand\nnewlines."),
        prompt="a restored story",
        age=age,
        length="short",
        language="en",
        provider="offline",
        model="offline-v1",
        degraded=True,
        illustration_url=None if age % 2 else "https://example.invalid/picture.png",
        prompt_tokens=age * 10,
        completion_tokens=age * 20,
        generation_ms=age,
        created_at=created_at,
    )


async def _migrate_and_fill(url: str, stories: list[StoryRecord]) -> None:
    repository = await PostgresStoryRepository.connect(
        url, min_size=1, max_size=2, command_timeout=10, connect_timeout=5
    )
    try:
        await repository.migrate()
        for story in stories:
            await repository.add(story)
    finally:
        await repository.close()


async def _snapshot(url: str) -> dict[str, Any]:
    """Every public table's rows (order-independent) and every index definition."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        tables = [
            row["tablename"]
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        snapshot: dict[str, Any] = {
            "indexes": [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE schemaname = 'public' ORDER BY 1"
                )
            ]
        }
        for table in tables:
            # Table names come from pg_tables, quoted as identifiers.
            rows = await conn.fetch(f'SELECT * FROM "{table}"')  # noqa: S608
            snapshot[table] = sorted((tuple(row) for row in rows), key=repr)
        return snapshot
    finally:
        await conn.close()


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def source_database(postgres_url: str) -> tuple[str, list[StoryRecord]]:
    """The scratch database, migrated, with stories that exercise awkward values."""
    now = datetime.now(UTC).replace(microsecond=123456)
    stories = [_story(f"Story {n}", 2 + n, now - timedelta(minutes=n)) for n in range(8)]
    asyncio.run(_migrate_and_fill(postgres_url, stories))
    return postgres_url, stories


@pytest.fixture
def restore_target(postgres_url: str) -> Iterator[str]:
    """An empty database on the same server, dropped after the test."""
    name = f"story_restore_{secrets.token_hex(4)}"
    asyncio.run(_execute(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _database_url(postgres_url, name)
    finally:
        asyncio.run(_execute(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _script_env(**settings: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "BACKUP_", "RESTORE_")) and key != "DATABASE_URL"
    }
    env["PGCONNECT_TIMEOUT"] = "5"
    env.update(settings)
    return env


def run_script(
    script: Path, *args: str, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(script), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )


def backup(url: str, backup_dir: Path, **settings: str) -> Path:
    result = run_script(
        BACKUP, env=_script_env(DATABASE_URL=url, BACKUP_DIR=str(backup_dir), **settings)
    )
    assert result.returncode == 0, result.stderr
    dump = Path(result.stdout.strip().splitlines()[-1])
    assert dump.parent == backup_dir
    assert dump.is_file()
    return dump


def restore(url: str, dump: Path) -> subprocess.CompletedProcess[str]:
    return run_script(RESTORE, "--yes", str(dump), env=_script_env(DATABASE_URL=url))


@pytest.mark.parametrize(("backup_format", "suffix"), [("custom", ".dump"), ("plain", ".gz")])
def test_restore_of_a_backup_reproduces_every_row(
    source_database: tuple[str, list[StoryRecord]],
    restore_target: str,
    tmp_path: Path,
    backup_format: str,
    suffix: str,
) -> None:
    source_url, stories = source_database
    dump = backup(source_url, tmp_path, BACKUP_FORMAT=backup_format)

    result = restore(restore_target, dump)

    assert result.returncode == 0, result.stderr
    assert dump.suffix == suffix
    original, restored = asyncio.run(_snapshot(source_url)), asyncio.run(_snapshot(restore_target))
    assert restored == original
    restored_ids = {row[0] for row in restored["stories"]}
    assert {story.id for story in stories} <= restored_ids


def test_restore_replaces_rows_written_after_the_backup(
    source_database: tuple[str, list[StoryRecord]], restore_target: str, tmp_path: Path
) -> None:
    source_url, _ = source_database
    dump = backup(source_url, tmp_path)
    # The target already has the schema and a story the backup never saw.
    late = _story("Written after the backup", 9, datetime.now(UTC))
    asyncio.run(_migrate_and_fill(restore_target, [late]))

    result = restore(restore_target, dump)

    assert result.returncode == 0, result.stderr
    assert asyncio.run(_snapshot(restore_target)) == asyncio.run(_snapshot(source_url))


def test_restore_refuses_without_confirmation(
    source_database: tuple[str, list[StoryRecord]], restore_target: str, tmp_path: Path
) -> None:
    source_url, _ = source_database
    dump = backup(source_url, tmp_path)

    result = run_script(RESTORE, str(dump), env=_script_env(DATABASE_URL=restore_target))

    assert result.returncode != 0
    assert "--yes" in result.stderr
    assert asyncio.run(_snapshot(restore_target)) == {"indexes": []}


def test_restore_latest_picks_the_newest_dump(
    source_database: tuple[str, list[StoryRecord]], restore_target: str, tmp_path: Path
) -> None:
    source_url, _ = source_database
    (tmp_path / "stories_20000101T000000Z.dump").write_bytes(b"not a dump")
    backup(source_url, tmp_path)

    result = run_script(
        RESTORE,
        "--yes",
        "latest",
        env=_script_env(DATABASE_URL=restore_target, BACKUP_DIR=str(tmp_path)),
    )

    assert result.returncode == 0, result.stderr
    assert asyncio.run(_snapshot(restore_target)) == asyncio.run(_snapshot(source_url))


def _age(path: Path, days: float) -> Path:
    path.write_bytes(b"old dump")
    when = time.time() - days * DAY
    os.utime(path, (when, when))
    return path


def test_retention_deletes_only_this_scripts_dumps_older_than_the_limit(
    source_database: tuple[str, list[StoryRecord]], tmp_path: Path
) -> None:
    source_url, _ = source_database
    expired = [
        _age(tmp_path / "stories_20200101T000000Z.dump", 10),
        _age(tmp_path / "stories_20200102T000000Z.sql.gz", 8),
    ]
    kept = [
        _age(tmp_path / "stories_20200103T000000Z.dump", 6),
        _age(tmp_path / "notes.txt", 30),
        _age(tmp_path / "other_20200101T000000Z.dump", 30),
    ]

    fresh = backup(source_url, tmp_path, BACKUP_RETENTION_DAYS="7")

    assert not any(path.exists() for path in expired)
    assert all(path.exists() for path in kept)
    assert fresh.exists()


def test_retention_zero_keeps_every_dump(
    source_database: tuple[str, list[StoryRecord]], tmp_path: Path
) -> None:
    source_url, _ = source_database
    ancient = _age(tmp_path / "stories_19990101T000000Z.dump", 400)

    backup(source_url, tmp_path, BACKUP_RETENTION_DAYS="0")

    assert ancient.exists()


def test_failed_backup_leaves_no_dump_and_no_success_marker(tmp_path: Path) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nowhere"

    result = run_script(BACKUP, env=_script_env(DATABASE_URL=unreachable, BACKUP_DIR=str(tmp_path)))

    assert result.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_backup_refuses_a_retention_that_is_not_a_number(tmp_path: Path) -> None:
    result = run_script(
        BACKUP,
        env=_script_env(
            DATABASE_URL="postgresql://unused", BACKUP_DIR=str(tmp_path), BACKUP_RETENTION_DAYS="7d"
        ),
    )

    assert result.returncode != 0
    assert "BACKUP_RETENTION_DAYS" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temporary_file_is_deleted_by_the_next_run(
    source_database: tuple[str, list[StoryRecord]], tmp_path: Path
) -> None:
    source_url, _ = source_database
    stale = _age(tmp_path / ".stories_20200101T000000Z.dump.partial", 1)
    running = tmp_path / ".stories_20990101T000000Z.dump.partial"  # written to just now
    running.write_bytes(b"half a dump")

    backup(source_url, tmp_path)

    assert not stale.exists()
    assert running.exists()


def _prod_healthcheck(service: str) -> str:
    """The backup service's health-check shell line, unescaped as compose would run it."""
    prod = yaml.safe_load((ROOT / "docker-compose.prod.yml").read_text(encoding="utf-8"))
    test = prod["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    return str(test[1]).replace("$$", "$")


@pytest.mark.parametrize("interval", ["10", "29", "86400"])
def test_the_backup_health_check_passes_after_a_fresh_success_at_any_interval(
    tmp_path: Path, interval: str
) -> None:
    # Two intervals, in minutes, rounded down to 0 below 30 s: "-mmin -0" matched
    # nothing and the service was unhealthy however recent its last dump.
    command = _prod_healthcheck("backup").replace("/backups", str(tmp_path))
    (tmp_path / ".last_success").touch()
    env = {"PATH": os.environ["PATH"], "BACKUP_INTERVAL_SECONDS": interval}

    fresh = subprocess.run(["sh", "-c", command], env=env, check=False, timeout=30)
    _age(tmp_path / ".last_success", 30)
    stale = subprocess.run(["sh", "-c", command], env=env, check=False, timeout=30)

    assert fresh.returncode == 0
    assert stale.returncode != 0
