"""The contract tests' server: `python -m app` as deployed, bearer JWTs on (HS256).

One server process per module, on SQLite in a temporary directory, with limits
far above what the tests send (the tests are about the contract, not the
limiter, whose 429 is documented and tested in tests/ops). Tokens are minted
as the identity provider would (`tests/fakes/jwks.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.jwks import AUDIENCE, HS256_SECRET, ISSUER, claims, hs256_token
from tests.support import ROOT, Server, free_port, server_process

SCHEMA_FILE = ROOT / "docs" / "openapi.json"


def checked_in_schema() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return document


def bearer(sub: str = "contract-alice", ttl: float = 3600) -> str:
    return hs256_token(claims(sub, ttl=ttl))


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory: Path = tmp_path_factory.mktemp("contract")
    port = free_port()
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "APP_ENV": "test",
        "DOCS_ENABLED": "true",
        "AUTH_MODE": "jwt",
        "AUTH_JWT_SECRET": HS256_SECRET,
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "DATABASE_SQLITE_PATH": str(directory / "stories.sqlite3"),
        "RATE_LIMIT_PER_CLIENT": "1000000/minute",
        "RATE_LIMIT_DEFAULT": "1000000/minute",
        "RATE_LIMIT_CREATE_STORY": "1000000/minute",
    }
    with server_process(["-m", "app"], env, port=port) as server:
        yield server
