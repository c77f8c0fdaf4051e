"""Several workers migrating one SQLite file at once, as `WEB_CONCURRENCY` > 1 starts them.

Each worker reads which versions are applied, then applies the rest one
transaction at a time; a second worker that read the same list waits for the
write lock and then finds the version already there. It must count that as
done, not fail its start (uvicorn's supervisor then stopped the whole server
with exit status 3: seen once in this session's runs of a two-worker start).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.db.repository import migration_versions
from app.db.sqlite import SqliteStoryRepository


async def test_workers_migrating_one_file_at_once_all_start(tmp_path: Path) -> None:
    path = tmp_path / "stories.sqlite3"
    for _ in range(5):  # the race needs the reads to interleave: try a few fresh files
        path.unlink(missing_ok=True)
        repositories = [await SqliteStoryRepository.open(path) for _ in range(4)]
        try:
            applied = await asyncio.gather(*(r.migrate() for r in repositories))
            recorded = await repositories[0].applied_migrations()
        finally:
            for repository in repositories:
                await repository.close()

        everything = list(migration_versions("sqlite"))
        assert recorded == everything
        # Each version applied by exactly one of them.
        assert sorted(v for versions in applied for v in versions) == everything
