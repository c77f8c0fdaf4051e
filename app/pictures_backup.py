"""Back up and restore the stored pictures: `python -m app.pictures_backup backup|restore DIR`.

Reads the object store from the same `OBJECT_STORE_*` settings as the service
(a local directory or an S3-compatible bucket). Every picture's key names the
SHA-256 of its bytes (`illustrations/<story id>/<sha256>.<ext>`), and a stored
picture never changes, so both directions copy only what the other side lacks:

- `backup DIR`: copies each picture missing from DIR into DIR/<key>, checked
  against the hash in its name and written under a temporary name first (a
  half-copied picture never looks backed up); `--prune` then deletes copies
  whose picture is no longer in the store (its story was deleted): run it
  with the database dump's retention, so no dump kept names a pruned picture.
  Touches DIR/.last_success when done.
- `restore DIR`: puts each picture of DIR missing from the store back.

Pair it with the database dump (scripts/backup.sh): the dump says which story
has which key; this copies the bytes (docs/runbook.md, "Pictures"). Exit
status 0 on success, 1 when any picture could not be copied.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from pathlib import Path

from app.platform.config import ObjectStoreSettings
from app.platform.objects import ObjectStore

PREFIX = "illustrations/"


def _hash_in_name(key: str) -> str:
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def _local_keys(root: Path) -> set[str]:
    base = root / PREFIX
    if not base.is_dir():
        return set()
    return {
        path.relative_to(root).as_posix()
        for path in base.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    }


async def backup(store: ObjectStore, root: Path, *, prune: bool) -> tuple[int, int, int]:
    """(copied, pruned, failed)."""
    keys = set(await store.keys(PREFIX))
    have = _local_keys(root)
    copied = failed = 0
    for key in sorted(keys - have):
        data = await store.get(key)
        if data is None:  # deleted since listed
            continue
        if hashlib.sha256(data).hexdigest() != _hash_in_name(key):
            print(f"backup: {key}: bytes do not match the hash in the name", file=sys.stderr)
            failed += 1
            continue
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        copied += 1
    pruned = 0
    if prune:
        for key in sorted(have - keys):
            (root / key).unlink(missing_ok=True)
            pruned += 1
    if not failed:
        (root / ".last_success").touch()
    return copied, pruned, failed


async def restore(store: ObjectStore, root: Path) -> tuple[int, int]:
    """(restored, failed)."""
    present = set(await store.keys(PREFIX))
    restored = failed = 0
    for key in sorted(_local_keys(root) - present):
        data = (root / key).read_bytes()
        if hashlib.sha256(data).hexdigest() != _hash_in_name(key):
            print(f"restore: {key}: bytes do not match the hash in the name", file=sys.stderr)
            failed += 1
            continue
        await store.put(key, data)
        restored += 1
    return restored, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.pictures_backup", description=__doc__)
    parser.add_argument("command", choices=["backup", "restore"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--prune", action="store_true", help="backup: drop deleted pictures")
    args = parser.parse_args(argv)
    store = ObjectStore.from_settings(ObjectStoreSettings())
    root: Path = args.directory
    root.mkdir(parents=True, exist_ok=True)
    if args.command == "backup":
        copied, pruned, failed = asyncio.run(backup(store, root, prune=args.prune))
        print(f"pictures backup: {copied} copied, {pruned} pruned, {failed} failed")
    else:
        copied, failed = asyncio.run(restore(store, root))
        print(f"pictures restore: {copied} restored, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
