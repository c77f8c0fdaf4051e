"""Fixtures shared by the integration tests: the settings of both databases with
HS256 tokens, and object storage (a local directory, and an S3 wire-protocol
server: moto in server mode, on 127.0.0.1, with a fresh bucket per test)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from app.platform.config import ObjectStoreSettings
from tests.integration.test_auth_api import SettingsFactory, hs256_auth
from tests.support import make_settings

S3_KEY_ID, S3_SECRET, S3_REGION = "test-key-id", "test-secret-key", "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a real S3 wire-protocol server (moto's, in a thread of this process)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_settings(endpoint: str, **changes: object) -> ObjectStoreSettings:
    """Settings of a new, empty bucket on the S3 server at `endpoint`."""
    bucket = f"pictures-{secrets.token_hex(6)}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        region_name=S3_REGION,
    ).create_bucket(Bucket=bucket)
    values: dict[str, object] = {
        "backend": "s3",
        "s3_endpoint": endpoint,
        "s3_bucket": bucket,
        "s3_region": S3_REGION,
        "s3_access_key_id": SecretStr(S3_KEY_ID),
        "s3_secret_access_key": SecretStr(S3_SECRET),
    }
    return ObjectStoreSettings(_env_file=None, **{**values, **changes})  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def object_store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStoreSettings:
    """Each object-store backend in turn: the same tests run against both."""
    if request.param == "s3":
        return s3_settings(request.getfixturevalue("s3_endpoint"))
    return ObjectStoreSettings(_env_file=None, backend="local", local_path=tmp_path / "objects")


@pytest.fixture(params=["sqlite", "postgres"])
def settings_for(request: pytest.FixtureRequest, tmp_path: Path) -> SettingsFactory:
    """HS256 settings on the parametrized database; extra keywords pass through."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("clean_postgres")
        return lambda **kwargs: make_settings(database_url=url, auth=hs256_auth(), **kwargs)
    path = tmp_path / "stories.sqlite3"
    return lambda **kwargs: make_settings(sqlite_path=path, auth=hs256_auth(), **kwargs)
