"""AUTH_* settings: the mode each environment gets, what production refuses, and the
development token command (`python -m app.tokens`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import ValidationError

from app.platform.config import AuthMode, AuthSettings, Settings
from app.tokens import main as tokens_main
from tests.fakes.jwks import AUDIENCE, HS256_SECRET, ISSUER

ROOT = Path(__file__).resolve().parents[2]
JWKS = {"jwks_url": "https://id.example.test/.well-known/jwks.json"}
PARTIES = {"issuer": ISSUER, "audience": AUDIENCE}


def settings(app_env: str, **auth: Any) -> Settings:
    return Settings(_env_file=None, app_env=app_env, auth=AuthSettings(_env_file=None, **auth))


@pytest.mark.parametrize(("app_env", "mode"), [("development", "none"), ("test", "none")])
def test_an_unset_mode_is_none_outside_production(app_env: str, mode: str) -> None:
    assert settings(app_env).auth.mode is AuthMode(mode)


def test_an_unset_mode_is_jwt_in_production() -> None:
    assert settings("production", **JWKS, **PARTIES).auth.mode is AuthMode.JWT


def test_production_refuses_to_start_with_auth_mode_none() -> None:
    with pytest.raises(ValidationError, match=r"AUTH_MODE=none .* refused with APP_ENV=production"):
        settings("production", mode="none")


def test_production_without_auth_settings_names_what_to_set() -> None:
    with pytest.raises(ValidationError, match="AUTH_JWKS_URL or AUTH_JWT_SECRET, AUTH_ISSUER"):
        settings("production")


@pytest.mark.parametrize(
    ("auth", "missing"),
    [
        ({**PARTIES}, "AUTH_JWKS_URL or AUTH_JWT_SECRET"),
        ({**JWKS, "issuer": ISSUER}, "AUTH_AUDIENCE"),
        ({"jwt_secret": HS256_SECRET, "audience": AUDIENCE}, "AUTH_ISSUER"),
    ],
)
def test_jwt_mode_without_a_key_source_issuer_or_audience_is_refused(
    auth: dict[str, Any], missing: str
) -> None:
    with pytest.raises(ValidationError, match=f"AUTH_MODE=jwt needs {missing}"):
        settings("development", mode="jwt", **auth)


def test_both_key_sources_at_once_are_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        settings("test", mode="jwt", jwt_secret=HS256_SECRET, **JWKS, **PARTIES)


def test_a_short_shared_secret_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        settings("test", mode="jwt", jwt_secret="too-short", **PARTIES)


def test_a_plain_http_jwks_url_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="https"):
        settings("production", jwks_url="http://id.example.test/jwks.json", **PARTIES)


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "APP_ENV": "production",
        "AUTH_JWKS_URL": JWKS["jwks_url"],
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "AUTH_JWT_SECRET": "",  # an empty optional Secret key is unset
        "AUTH_LEEWAY_SECONDS": "10",
    }.items():
        monkeypatch.setenv(name, value)

    loaded = Settings(_env_file=None)

    assert (loaded.auth.mode, loaded.auth.jwt_secret, loaded.auth.leeway_seconds) == (
        AuthMode.JWT,
        None,
        10,
    )


def test_the_service_refuses_to_start_in_production_with_auth_mode_none() -> None:
    env = {**_clean_env(), "APP_ENV": "production", "AUTH_MODE": "none"}
    result = subprocess.run(
        [sys.executable, "-c", "from app.platform.config import Settings; Settings()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode != 0
    assert "set AUTH_MODE=jwt" in result.stderr


def _clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "APP_ENV"))}
    return {**env, **values}


def _dev_token_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in [k for k in os.environ if k.startswith("AUTH_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT / "tests")  # no stray .env
    monkeypatch.setenv("APP_ENV", values.pop("APP_ENV", "development"))
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_the_token_command_mints_a_token_the_service_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _dev_token_env(
        monkeypatch,
        AUTH_MODE="jwt",
        AUTH_JWT_SECRET=HS256_SECRET,
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
    )

    assert tokens_main(["--sub", "alice", "--ttl", "120"]) == 0

    token = capsys.readouterr().out.strip()
    decoded = jwt.decode(token, HS256_SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert (decoded["sub"], decoded["iss"], decoded["exp"] - decoded["iat"]) == (
        "alice",
        ISSUER,
        120,
    )


def test_the_token_command_refuses_in_production(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _dev_token_env(
        monkeypatch,
        APP_ENV="production",
        AUTH_JWT_SECRET=HS256_SECRET,
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
    )

    assert tokens_main(["--sub", "alice"]) == 2
    assert "production" in capsys.readouterr().err


def test_the_token_command_needs_the_secret_issuer_and_audience(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _dev_token_env(monkeypatch, AUTH_ISSUER=ISSUER)

    assert tokens_main(["--sub", "alice"]) == 2
    assert "AUTH_JWT_SECRET" in capsys.readouterr().err


def test_the_token_command_runs_as_a_module() -> None:
    env = _clean_env(
        APP_ENV="development",
        AUTH_MODE="jwt",
        AUTH_JWT_SECRET=HS256_SECRET,
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
    )
    result = subprocess.run(
        [sys.executable, "-m", "app.tokens", "--sub", "bob"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    claims = jwt.decode(
        result.stdout.strip(), HS256_SECRET, algorithms=["HS256"], audience=AUDIENCE
    )
    assert claims["sub"] == "bob"
