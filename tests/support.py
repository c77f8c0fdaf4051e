"""Helpers that build real apps for tests: explicit settings, a running lifespan, an HTTP client.

Settings are built explicitly (never from the developer's shell), so a key in
the environment cannot change which providers a test talks to.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from app.core.config import (
    DatabaseSettings,
    OpenAISettings,
    RateLimitSettings,
    RedisSettings,
    ReplicateSettings,
    ResilienceSettings,
    Settings,
)
from app.main import create_app

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
        OpenAISettings(_env_file=None, api_key=SecretStr("sk-test"), base_url=openai_base_url)
        if openai_base_url
        else OpenAISettings(_env_file=None, api_key=None)
    )
    replicate = (
        ReplicateSettings(
            _env_file=None,
            api_token=SecretStr("r8_test"),
            base_url=replicate_base_url,
            poll_interval_seconds=0.01,
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
        RateLimitSettings(_env_file=None, default="100000/minute", create_story="100000/minute"),
    )
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
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, lifespan started, reached over ASGI by an HTTP client."""
    app = create_app(settings)
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as client,
    ):
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def uvicorn_process(env: Mapping[str, str], *, port: int | None = None) -> Iterator[str]:
    """`uvicorn app.main:app` as an operator runs it, in a child process; yields its URL.

    Stopped by its own process id (SIGTERM, then SIGKILL after 10 s).
    """
    port = port or free_port()
    child_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENAI_", "REPLICATE_", "DATABASE_", "REDIS_"))
    }
    child_env.update(env)
    # A file, not a pipe: a pipe nobody reads fills up and stalls the server.
    with tempfile.TemporaryFile() as log:
        command = [sys.executable, "-m", "uvicorn", "app.main:app"]
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_live(process, url, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _wait_until_live(process: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"server exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"{url}/health/live", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become live within 30 s")
        time.sleep(0.1)


STORY_BODY: dict[str, Any] = {
    "prompt": "a dragon who is afraid of the dark",
    "age": 6,
    "length": "short",
    "language": "en",
    "illustrate": False,
}
