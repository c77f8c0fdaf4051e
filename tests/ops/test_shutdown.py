"""Graceful shutdown: on SIGTERM readiness fails at once, in-flight requests finish."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import httpx
import psutil
import pytest

from app.platform.shutdown import DrainOnSignal
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.ops.servers import app_server
from tests.support import STORY_BODY

COMPLETIONS = "/v1/chat/completions"


@pytest.fixture
def stand_in_server_handler() -> Iterator[list[int]]:
    """A SIGTERM handler standing in for uvicorn's; records the signals it receives."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


async def until(condition: object, within: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(within):
        # Polling: the condition is set from a signal handler, not by a task.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_sigterm_marks_draining_then_reaches_the_servers_handler(
    stand_in_server_handler: list[int],
) -> None:
    drained: list[bool] = []
    hook = DrainOnSignal(lambda: drained.append(True))
    assert hook.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        await until(lambda: stand_in_server_handler)
    finally:
        hook.uninstall()

    assert drained == [True]
    assert stand_in_server_handler == [signal.SIGTERM]


async def test_with_a_drain_delay_the_server_hears_of_sigterm_only_after_it(
    stand_in_server_handler: list[int],
) -> None:
    drained: list[bool] = []
    hook = DrainOnSignal(lambda: drained.append(True), delay_seconds=1.0)
    hook.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        await until(lambda: drained)
        heard_at_once = list(stand_in_server_handler)
        await until(lambda: stand_in_server_handler)
    finally:
        hook.uninstall()

    assert heard_at_once == []
    assert stand_in_server_handler == [signal.SIGTERM]


async def test_uninstalling_restores_the_servers_handler(
    stand_in_server_handler: list[int],
) -> None:
    server_handler = signal.getsignal(signal.SIGTERM)
    hook = DrainOnSignal(lambda: None)
    hook.install()
    hook.uninstall()

    assert signal.getsignal(signal.SIGTERM) is server_handler


def test_without_a_server_handler_the_hook_stays_out_of_the_way() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        hook = DrainOnSignal(lambda: None)
        installed = asyncio.run(_install(hook))
        current = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert installed is False
    assert current is signal.SIG_DFL


def story_in_flight(
    url: str, fake_openai: FakeOpenAI
) -> tuple[threading.Thread, list[httpx.Response]]:
    """A story request that has reached (the slow) OpenAI; its response lands in the list."""
    in_flight: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: in_flight.append(
            httpx.post(f"{url}/v1/stories", json=STORY_BODY, timeout=30)
        )
    )
    request.start()
    deadline = time.monotonic() + 10
    while fake_openai.count(path=COMPLETIONS) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake_openai.count(path=COMPLETIONS) == 1, "the story request never reached OpenAI"
    return request, in_flight


async def _install(hook: DrainOnSignal) -> bool:
    return hook.install()


@pytest.mark.slow
def test_a_real_server_drains_on_sigterm_and_finishes_the_request_in_flight(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.set_fault(Fault.delay(3.0), path=COMPLETIONS)
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "SHUTDOWN_GRACE_SECONDS": "15",
        # Keep accepting for a moment after SIGTERM, so readiness can be asked.
        "SHUTDOWN_DRAIN_DELAY_SECONDS": "2",
    }
    with app_server(env) as server:
        before = httpx.get(f"{server.url}/health/ready", timeout=5)
        request, in_flight = story_in_flight(server.url, fake_openai)

        server.process.send_signal(signal.SIGTERM)
        during = httpx.get(f"{server.url}/health/ready", timeout=5)
        request.join(timeout=30)
        exited = server.process.wait(timeout=30)

    assert before.status_code == 200
    assert during.status_code == 503
    assert during.json()["failing"] == ["lifecycle"]
    assert [r.status_code for r in in_flight] == [201]
    assert in_flight[0].json()["provider"] == "openai"
    assert exited is not None


def _refused(url: str) -> bool:
    """Whether a new TCP connection to the server's port is refused."""
    host, _, port = url.removeprefix("http://").partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.slow
def test_with_several_workers_new_connections_are_refused_while_the_in_flight_drain(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # uvicorn's supervisor kept its copy of the listening socket until every worker
    # had drained: new connections were accepted into a backlog nobody read, hung,
    # and were reset at exit. They must be refused at once, as with one worker.
    fake_openai.set_fault(Fault.delay(4.0), path=COMPLETIONS)
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "WEB_CONCURRENCY": "2",
        "SHUTDOWN_GRACE_SECONDS": "15",
    }
    with app_server(env) as server:
        request, in_flight = story_in_flight(server.url, fake_openai)

        server.process.send_signal(signal.SIGTERM)
        refused_while_in_flight = False
        while request.is_alive():
            if _refused(server.url):
                refused_while_in_flight = not in_flight
                break
            time.sleep(0.05)
        request.join(timeout=30)
        exit_status = server.process.wait(timeout=30)

    assert refused_while_in_flight, "new connections were accepted until the drain ended"
    assert [r.status_code for r in in_flight] == [201]
    assert exit_status == 0


@pytest.mark.slow
def test_a_killed_workers_gauges_are_dropped_when_it_is_replaced(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    env = {
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }

    def live_gauge_pids() -> set[int]:
        return {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("gauge_live*_*.db")}

    def workers_of(parent: int) -> list[psutil.Process]:
        # Workers are spawned (`spawn_main`); multiprocessing's resource tracker is not one.
        workers = []
        for child in psutil.Process(parent).children():
            with contextlib.suppress(psutil.Error):  # a killed one is a zombie until reaped
                if any("spawn_main" in part for part in child.cmdline()):
                    workers.append(child)
        return workers

    with app_server(env) as server:
        workers = workers_of(server.process.pid)
        assert len(workers) == 2
        deadline = time.monotonic() + 20
        while not {w.pid for w in workers} <= live_gauge_pids() and time.monotonic() < deadline:
            httpx.get(f"{server.url}/health/live", timeout=5)  # each worker samples its gauges
            time.sleep(0.1)
        assert {w.pid for w in workers} <= live_gauge_pids()

        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        replaced: set[int] = set()
        while time.monotonic() < deadline:
            now = {c.pid for c in workers_of(server.process.pid)}
            replaced = now - {w.pid for w in workers}
            if replaced and victim.pid not in live_gauge_pids():
                break
            time.sleep(0.1)

    assert replaced, "the supervisor did not replace the killed worker"
    assert victim.pid not in live_gauge_pids(), "the killed worker's gauges are still counted"
