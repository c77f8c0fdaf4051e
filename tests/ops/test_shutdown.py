"""Graceful shutdown: on SIGTERM readiness fails at once, in-flight requests finish."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import httpx
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
        in_flight: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: in_flight.append(
                httpx.post(f"{server.url}/v1/stories", json=STORY_BODY, timeout=30)
            )
        )
        request.start()
        deadline = time.monotonic() + 10
        while fake_openai.count(path=COMPLETIONS) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake_openai.count(path=COMPLETIONS) == 1, "the story request never reached OpenAI"

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
