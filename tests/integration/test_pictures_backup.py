"""`python -m app.pictures_backup`: the stored pictures copied out and back, on both stores."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from app.pictures_backup import backup, restore
from app.platform.config import ObjectStoreSettings
from app.platform.objects import ObjectStore
from tests.support import ROOT


def picture(n: int) -> tuple[str, bytes]:
    data = os.urandom(1000 + n)
    return f"illustrations/story-{n}/{hashlib.sha256(data).hexdigest()}.webp", data


async def test_a_lost_store_is_restored_byte_identical_from_the_backup(
    object_store_settings: ObjectStoreSettings, tmp_path: Path
) -> None:
    store = ObjectStore.from_settings(object_store_settings)
    pictures = dict(picture(n) for n in range(3))
    for key, data in pictures.items():
        await store.put(key, data)
    root = tmp_path / "backup"

    assert await backup(store, root, prune=False) == (3, 0, 0)
    assert await backup(store, root, prune=False) == (0, 0, 0)  # only what is missing
    for key in pictures:
        await store.delete(key)  # the bucket is lost
    assert await restore(store, root) == (3, 0)

    for key, data in pictures.items():
        assert await store.get(key) == data
    assert (root / ".last_success").exists()


async def test_prune_drops_the_copies_of_deleted_pictures_and_tampering_is_caught(
    object_store_settings: ObjectStoreSettings, tmp_path: Path
) -> None:
    store = ObjectStore.from_settings(object_store_settings)
    (kept, kept_data), (gone, gone_data) = picture(1), picture(2)
    await store.put(kept, kept_data)
    await store.put(gone, gone_data)
    root = tmp_path / "backup"
    await backup(store, root, prune=True)
    await store.delete(gone)  # its story was deleted

    assert await backup(store, root, prune=True) == (0, 1, 0)
    assert not (root / gone).exists()
    await store.delete(kept)
    (root / kept).write_bytes(b"not the picture")
    assert await restore(store, root) == (0, 1)
    assert await store.get(kept) is None


def test_the_command_line_backs_up_the_configured_store(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    key, data = picture(7)
    (objects / key).parent.mkdir(parents=True)
    (objects / key).write_bytes(data)
    env = {
        **os.environ,
        "OBJECT_STORE_BACKEND": "local",
        "OBJECT_STORE_LOCAL_PATH": str(objects),
    }

    done = subprocess.run(
        [sys.executable, "-m", "app.pictures_backup", "backup", str(tmp_path / "b")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "1 copied" in done.stdout
    assert (tmp_path / "b" / key).read_bytes() == data
