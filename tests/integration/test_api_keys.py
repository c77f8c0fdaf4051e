"""API keys for server-to-server callers: made with the command, checked on every request.

The keys are created and revoked with `python -m app.api_keys` as an operator
would (a subprocess, on the same database as the service), and used over HTTP on
both databases: a valid key is its own principal (`key:<name>`), owning its
stories apart from every JWT subject; a revoked, unknown or forged key is a 401
problem; a key store that cannot answer is a 503, not a 401. Revocation holds on
every worker of a several-worker server from the next request.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.security.api_keys import (
    ApiKeyStoreUnavailableError,
    matches,
    new_api_key,
    parse_api_key,
)
from app.db.api_keys import PostgresApiKeyStore
from app.platform.config import Settings
from tests.integration.test_auth_api import as_, assert_unauthorized, hs256_auth
from tests.ops.servers import app_server
from tests.support import STORY_BODY, free_port, make_settings, run_python, serve

SettingsFactory = Callable[..., Settings]


def api_keys(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m app.api_keys ARGS` with the service's database settings in `env`."""
    return run_python(["-m", "app.api_keys", *args], env)


def create_key(env: Mapping[str, str], name: str) -> str:
    done = api_keys(env, "create", name)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The environment naming the database, for the command and for the service."""
    if request.param == "postgres":
        return {"DATABASE_URL": request.getfixturevalue("clean_postgres")}
    return {"DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3")}


def settings_on(database: Mapping[str, str], **changes: Any) -> Settings:
    changes.setdefault("auth", hs256_auth())
    if "DATABASE_URL" in database:
        return make_settings(database_url=database["DATABASE_URL"], **changes)
    return make_settings(sqlite_path=Path(database["DATABASE_SQLITE_PATH"]), **changes)


def test_a_key_is_well_formed_and_only_its_hash_is_kept() -> None:
    created = new_api_key("partner", datetime.now(UTC))
    key_id, secret = parse_api_key(created.token)

    assert key_id == created.record.id
    assert secret not in created.record.secret_sha256
    assert matches(created.record, secret)
    assert not matches(created.record, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert created.record.principal == "key:partner"
    with pytest.raises(ValueError, match="key name"):
        new_api_key("Partner Backend", datetime.now(UTC))


async def test_a_valid_key_is_its_own_principal(database: dict[str, str]) -> None:
    token = create_key(database, "partner")
    async with serve(settings_on(database)) as client:
        created = await client.post("/v1/stories", json=STORY_BODY, headers=bearer(token))
        mine = await client.get("/v1/stories", headers=bearer(token))
        by_alice = await client.get(created.headers["location"], headers=as_("alice"))

    assert created.status_code == 201, created.text
    assert [s["id"] for s in mine.json()["items"]] == [created.json()["id"]]
    assert by_alice.status_code == 404  # a key's stories are its own


async def test_a_revoked_key_is_refused_from_the_next_request(database: dict[str, str]) -> None:
    token = create_key(database, "partner")
    key_id, _ = parse_api_key(token)
    async with serve(settings_on(database)) as client:
        before = await client.get("/v1/stories", headers=bearer(token))
        revoked = api_keys(database, "revoke", key_id)
        after = await client.get("/v1/stories", headers=bearer(token))
        again = api_keys(database, "revoke", key_id)
        listed = api_keys(database, "list")

    assert before.status_code == 200
    assert revoked.returncode == 0, revoked.stderr
    assert_unauthorized(after, "API key revoked")
    assert again.returncode == 1
    assert f"{key_id}\tkey:partner\t" in listed.stdout
    assert "revoked" in listed.stdout
    assert token.split("_")[-1] not in listed.stdout + listed.stderr


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("sk_story_aaaaaaaaaaaa_" + "A" * 43, "unknown API key"),
        ("sk_story_short", "malformed API key"),
    ],
)
async def test_unknown_and_malformed_keys_are_refused(
    database: dict[str, str], token: str, reason: str
) -> None:
    async with serve(settings_on(database)) as client:
        response = await client.get("/v1/stories", headers=bearer(token))

    body = assert_unauthorized(response, reason)
    assert token not in response.text
    assert token not in str(body)


async def test_a_forged_secret_for_a_real_id_is_refused(database: dict[str, str]) -> None:
    token = create_key(database, "partner")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    async with serve(settings_on(database)) as client:
        response = await client.get("/v1/stories", headers=bearer(forged))

    assert_unauthorized(response, "unknown API key")


async def test_keys_can_be_switched_off(database: dict[str, str]) -> None:
    token = create_key(database, "partner")
    auth = hs256_auth(api_keys=False)
    async with serve(settings_on(database, auth=auth)) as client:
        response = await client.get("/v1/stories", headers=bearer(token))

    assert_unauthorized(response, "malformed token")  # not a JWT: the JWT check refuses it


async def test_a_store_that_does_not_answer_is_unavailable_not_unauthorized() -> None:
    closed = free_port()
    store = PostgresApiKeyStore(
        f"postgresql://postgres@127.0.0.1:{closed}/nothing", timeout_seconds=1, retry_seconds=60
    )
    try:
        with pytest.raises(ApiKeyStoreUnavailableError):
            await store.find("aaaaaaaaaaaa")
        # Backing off: the next call does not pay another connection attempt.
        with pytest.raises(ApiKeyStoreUnavailableError, match="backing off"):
            await store.find("aaaaaaaaaaaa")
    finally:
        await store.close()


async def test_a_key_while_the_database_is_down_is_a_503_not_a_401() -> None:
    # The service starts without its database (and keeps trying); the key may be valid.
    settings = make_settings(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", auth=hs256_auth()
    )
    async with serve(settings) as client:
        response = await client.get(
            "/v1/stories", headers=bearer("sk_story_aaaaaaaaaaaa_" + "A" * 43)
        )

    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1


@pytest.mark.slow
def test_revocation_holds_on_every_worker(tmp_path: Path) -> None:
    env = {
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "WEB_CONCURRENCY": "2",
        "RATE_LIMIT_ENABLED": "false",
    }
    token = create_key(env, "partner")
    key_id, _ = parse_api_key(token)
    with app_server(env) as server:
        # A new connection per request: the kernel spreads them over both workers.
        before = [
            httpx.get(f"{server.url}/v1/stories", headers=bearer(token), timeout=10).status_code
            for _ in range(20)
        ]
        assert api_keys(env, "revoke", key_id).returncode == 0
        after = [
            httpx.get(f"{server.url}/v1/stories", headers=bearer(token), timeout=10).status_code
            for _ in range(20)
        ]

    assert before == [200] * 20
    assert after == [401] * 20
