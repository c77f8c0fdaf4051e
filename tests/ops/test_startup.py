"""Starting `python -m app` as operators do: without its database, and with a fatal error.

A PostgreSQL that does not answer at start does not stop the service: it is
live, not ready (readiness names `database`), answers API calls that need the
database with 503 + Retry-After, and becomes ready by itself once the database
answers. A startup that does fail exits non-zero, with one worker or several.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from app.db.deferred import DeferredRepository
from app.db.repository import StorageUnavailableError, StoryRepository
from tests.fakes.fault_proxy import FaultProxy
from tests.ops.servers import app_server
from tests.support import _OWN_PREFIXES, ROOT, STORY_BODY, free_port

pytestmark = pytest.mark.slow

# A hang guard, not a measurement: the backoff is capped at 30 s.
RECOVERY_GUARD_SECONDS = 120.0
PASSWORD = "not-a-real-secret-7f3a"


def poll(condition: Callable[[], bool], *, within: float) -> bool:
    """True once `condition()` holds; False when `within` seconds pass first."""
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture
def postgres_behind_proxy(clean_postgres: str) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the test database, and a URL through it with a password
    (the test server trusts local connections, so the password is never checked)."""
    parts = urlsplit(clean_postgres)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    user = parts.username or "postgres"
    netloc = f"{user}:{PASSWORD}@127.0.0.1:{proxy.port}"
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        proxy.stop()


@pytest.mark.postgres
def test_starts_without_its_database_and_becomes_ready_when_it_answers(
    postgres_behind_proxy: tuple[FaultProxy, str],
) -> None:
    proxy, url = postgres_behind_proxy
    proxy.set_mode("down")
    env = {"DATABASE_URL": url, "LOG_LEVEL": "INFO"}
    with app_server(env) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        live = client.get("/health/live")
        ready = client.get("/health/ready")
        created = client.post("/v1/stories", json=STORY_BODY)
        listed = client.get("/v1/stories")

        assert live.status_code == 200
        assert ready.status_code == 503
        assert ready.json()["failing"] == ["database"]
        for refused in (created, listed):
            assert refused.status_code == 503
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert int(refused.headers["retry-after"]) >= 1

        proxy.set_mode("pass")
        became_ready = poll(
            lambda: client.get("/health/ready").status_code == 200,
            within=RECOVERY_GUARD_SECONDS,
        )
        assert became_ready, server.output()
        story = client.post("/v1/stories", json=STORY_BODY)
        assert story.status_code == 201, story.text
        fetched = client.get(f"/v1/stories/{story.json()['id']}")
        assert fetched.status_code == 200
        output = server.output()
        # Same process all along: no restart.
        assert server.process.poll() is None

    assert "database not available" in output
    assert PASSWORD not in output


def run_to_exit(env: Mapping[str, str], *, within: float = 120.0) -> tuple[int, str]:
    """`python -m app` with `env` until it exits by itself (killed after `within`: a hang)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    child_env.update({"HOST": "127.0.0.1", "PORT": str(free_port()), **env})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=child_env,
            capture_output=True,
            timeout=within,
            check=False,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"python -m app did not exit: {hung.stdout!r} {hung.stderr!r}")
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_database_file_that_cannot_be_opened_exits_non_zero_with_any_worker_count(
    tmp_path: Path, workers: str
) -> None:
    # A directory where the SQLite file should be: it cannot be opened.
    blocked = tmp_path / "stories.sqlite3"
    blocked.mkdir()
    status, output = run_to_exit(
        {"WEB_CONCURRENCY": workers, "DATABASE_SQLITE_PATH": str(blocked), "LOG_LEVEL": "INFO"}
    )

    assert status != 0, output
    assert "cannot open the SQLite database" in output
    assert_json_lines(output)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_invalid_settings_exit_non_zero_with_any_worker_count_without_the_secret(
    tmp_path: Path, workers: str
) -> None:
    status, output = run_to_exit(
        {
            "WEB_CONCURRENCY": workers,
            "DATABASE_POOL_MIN_SIZE": "not-a-number",
            "DATABASE_URL": f"postgresql://story:{PASSWORD}@127.0.0.1:1/stories",
        }
    )

    assert status != 0, output
    assert "pool_min_size" in output
    assert PASSWORD not in output
    assert_json_lines(output)


def test_an_invalid_server_setting_is_named_in_a_log_line_not_a_traceback() -> None:
    status, output = run_to_exit({"PORT": "70000", "WEB_CONCURRENCY": "not-a-number"})

    assert status != 0, output
    assert "invalid settings (ServerSettings)" in output
    assert "port:" in output
    assert "web_concurrency:" in output
    assert "Traceback" not in output
    assert_json_lines(output)


def test_a_clean_stop_of_several_workers_exits_zero(tmp_path: Path) -> None:
    env = {"WEB_CONCURRENCY": "2", "DATABASE_SQLITE_PATH": str(tmp_path / "s.db")}
    with app_server(env) as server:
        assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(timeout=30)
        output = server.output()
    assert status == 0, output
    assert_json_lines(output)


def assert_json_lines(output: str) -> None:
    """Every line the server printed, its supervisor's included, is one JSON object."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert {"time", "level", "logger", "message"} <= set(entry), line


async def test_the_deferred_repository_backs_off_redacts_and_stops_on_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    waits: list[float] = []
    gate = asyncio.Event()
    parked = asyncio.Event()

    async def record(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) >= 8:
            parked.set()
            await gate.wait()  # parked here until close() cancels the task

    async def refuse() -> StoryRepository:
        raise OSError(f"connect failed for postgresql://u:{PASSWORD}@db/x")

    deferred = DeferredRepository("postgres", refuse, secrets=[PASSWORD], sleep=record)
    await deferred.start()
    async with asyncio.timeout(30):  # a hang guard
        await parked.wait()
    with pytest.raises(StorageUnavailableError, match="not connected"):
        await deferred.ping()
    await deferred.close()

    assert deferred._task is None
    assert all(0 <= wait <= 30 for wait in waits)
    failures = [r for r in caplog.records if r.getMessage().startswith("database not available")]
    assert len(failures) == deferred.attempts == 8
    assert all(PASSWORD not in str(r.__dict__) for r in caplog.records)
    assert [r.__dict__["next_retry_ceiling_seconds"] for r in failures] == [
        0.5,
        1,
        2,
        4,
        8,
        16,
        30,
        30,
    ]
