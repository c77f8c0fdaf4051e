"""`python -m app.api_keys`: create, list and revoke API keys for server-to-server callers.

    python -m app.api_keys create partner-backend   # prints the key ONCE
    python -m app.api_keys list
    python -m app.api_keys revoke <id>

Works on the database the service uses (`DATABASE_URL`, else the SQLite file at
`DATABASE_SQLITE_PATH`), read from the environment or `.env` as the service reads
them; applies pending migrations first. A key authenticates as the principal
`key:<name>` (`Authorization: Bearer sk_story_...`). Only a hash of the key is
stored: a lost key cannot be shown again; revoke it and create another.
Revocation holds on every worker and replica from their next request.
Exit status: 0 done, 1 nothing to revoke, 2 refused (settings, name, database).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from pydantic import ValidationError

from app.core.security.api_keys import ApiKeyStoreUnavailableError, new_api_key, valid_name
from app.db.api_keys import open_api_key_store
from app.lifespan import open_repository
from app.platform.config import Settings


async def _migrate(settings: Settings) -> None:
    repository = await open_repository(settings)
    try:
        await repository.migrate()
    finally:
        await repository.close()


async def run(args: argparse.Namespace, settings: Settings) -> int:
    await _migrate(settings)
    store = open_api_key_store(settings)
    try:
        now = datetime.now(UTC)
        if args.command == "create":
            created = new_api_key(args.name, now)
            await store.add(created.record)
            print(created.token)
            print(
                f"key {created.record.id} for principal {created.record.principal}: "
                "store it now, it is not shown again",
                file=sys.stderr,
            )
            return 0
        if args.command == "revoke":
            if await store.revoke(args.id, now):
                print(f"revoked {args.id}", file=sys.stderr)
                return 0
            print(f"no active key {args.id}", file=sys.stderr)
            return 1
        for record in await store.list_keys():
            state = f"revoked {record.revoked_at.isoformat()}" if record.revoked_at else "active"
            print(f"{record.id}\t{record.principal}\t{record.created_at.isoformat()}\t{state}")
        return 0
    finally:
        await store.close()


def _name(text: str) -> str:
    if not valid_name(text):
        raise argparse.ArgumentTypeError(
            "1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.api_keys", description="Manage API keys (server-to-server callers)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name", type=_name, help="who holds it; the principal is key:<name>")
    revoke = commands.add_parser("revoke", help="revoke a key by its id (see list)")
    revoke.add_argument("id")
    commands.add_parser("list", help="every key: id, principal, created, state")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"the settings are refused:\n{error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, settings))
    except (ApiKeyStoreUnavailableError, OSError, RuntimeError) as error:
        print(f"the database did not answer: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
