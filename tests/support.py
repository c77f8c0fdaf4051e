"""Helpers that build real apps for tests: explicit settings, a running lifespan, an HTTP client.

Settings are built explicitly (never from the developer's shell), so a key in
the environment cannot change which providers a test talks to.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic import SecretStr

from app.main import create_app
from app.platform.config import (
    DatabaseSettings,
    OpenAISettings,
    RateLimitSettings,
    RedisSettings,
    ReplicateSettings,
    ResilienceSettings,
    Settings,
)

ROOT = Path(__file__).resolve().parent.parent


def make_settings(
    *,
    sqlite_path: Path | None = None,
    database_url: str | None = None,
    redis_url: str | None = None,
    openai_base_url: str | None = None,
    replicate_base_url: str | None = None,
    **overrides: Any,
) -> Settings:
    openai = (
        # Floors far below the seconds real models need: tests use short deadlines.
        OpenAISettings(
            _env_file=None,
            api_key=SecretStr("sk-test"),
            base_url=openai_base_url,
            floor_seconds=0.1,
        )
        if openai_base_url
        else OpenAISettings(_env_file=None, api_key=None)
    )
    replicate = (
        ReplicateSettings(
            _env_file=None,
            api_token=SecretStr("r8_test"),
            base_url=replicate_base_url,
            poll_interval_seconds=0.01,
            floor_seconds=0.1,
        )
        if replicate_base_url
        else ReplicateSettings(_env_file=None, api_token=None)
    )
    database = DatabaseSettings(
        _env_file=None,
        url=SecretStr(database_url) if database_url else None,
        sqlite_path=sqlite_path or Path("data/test.sqlite3"),
    )
    redis = RedisSettings(_env_file=None, url=SecretStr(redis_url) if redis_url else None)
    # Real policies with short waits, so tests exercise retries without sleeping seconds.
    overrides.setdefault(
        "resilience",
        ResilienceSettings(
            _env_file=None, retry_base_delay_seconds=0.01, retry_max_delay_seconds=0.05
        ),
    )
    # Generous limits unless a test is about rate limiting: a test's own burst of
    # requests must not be refused by the limiter it is not testing.
    overrides.setdefault(
        "rate_limit",
        RateLimitSettings(
            _env_file=None,
            per_client="100000/minute",
            default="100000/minute",
            create_story="100000/minute",
        ),
    )
    # Every scrape rendered afresh unless a test is about the page cache: tests read
    # /metrics before and after an action, well within METRICS_CACHE_SECONDS.
    overrides.setdefault("metrics_cache_seconds", 0.0)
    return Settings(
        _env_file=None,
        app_env="test",
        openai=openai,
        replicate=replicate,
        database=database,
        redis=redis,
        **overrides,
    )


@asynccontextmanager
async def serve_app(
    settings: Settings, *, app: FastAPI | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app (built from `settings` unless given), lifespan started, and an
    HTTP client reaching it over ASGI."""
    app = app or create_app(settings)
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as client,
    ):
        yield app, client


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, lifespan started, reached over ASGI by an HTTP client."""
    async with serve_app(settings) as (_, client):
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# A child server's settings come from the `env` it is given, never from the
# developer's shell.
_OWN_PREFIXES = (
    "OPENAI_",
    "REPLICATE_",
    "DATABASE_",
    "REDIS_",
    "RATE_LIMIT_",
    "HEALTH_",
    "SENTRY_",
    "MAINTENANCE_",
    "SHUTDOWN_",
    "AUTH_",
    "MODERATION_",
    "DOCS_ENABLED",
    "METRICS_",
    "OBJECT_STORE_",
    "ILLUSTRATION_",
    "STORY_",
    "RESILIENCE_",
    "IDEMPOTENCY_",
    "TRUSTED_PROXIES",
    "PROMETHEUS_MULTIPROC_DIR",
    "WEB_CONCURRENCY",
    "FORWARDED_ALLOW_IPS",
)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def run_python(
    args: Sequence[str], env: Mapping[str, str], *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` in the project root, as an operator runs a command: `env` over
    the developer's environment without the service's own settings."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**child_env, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def server_process(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    port: int,
    ready_paths: Sequence[str] = ("/health/live",),
    ready_within: float = 30.0,
) -> Iterator[Server]:
    """`python <args>` in a child process serving on 127.0.0.1:`port`.

    Yields once one of `ready_paths` answers 200; stopped by its process id
    (SIGTERM, then SIGKILL to the process group it leads: its workers go too).
    Its output goes to a file, not a pipe: a pipe nobody reads fills up and
    stalls the server.
    """
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    child_env.update(env)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group
        )
        server = Server(f"http://127.0.0.1:{port}", process, log)
        try:
            _wait_until_ready(server, ready_paths, ready_within)
            yield server
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
    """SIGTERM by pid; after `grace` s, SIGKILL to the group this process leads."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _wait_until_ready(server: Server, paths: Sequence[str], within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.output()}"
            )
        for path in paths:
            try:
                if httpx.get(f"{server.url}{path}", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready within {within} s:\n{server.output()}")
        time.sleep(0.1)


@contextmanager
def uvicorn_process(env: Mapping[str, str], *, port: int | None = None) -> Iterator[str]:
    """`uvicorn app.main:app` as an operator runs it, in a child process; yields its URL."""
    port = port or free_port()
    args = ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with server_process(args, env, port=port) as server:
        yield server.url


STORY_BODY: dict[str, Any] = {
    "prompt": "a dragon who is afraid of the dark",
    "age": 6,
    "length": "short",
    "language": "en",
    "illustrate": False,
}
