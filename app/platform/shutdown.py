"""Graceful shutdown: the SIGTERM hook that makes an instance drain before it stops.

uvicorn installs its own SIGTERM/SIGINT handlers (with
`signal.signal`) before the app starts; `DrainOnSignal` wraps them: the moment a
signal arrives it marks the app as draining (`/health/ready` answers 503 from
then on) and then hands the signal to uvicorn's handler, which stops accepting
connections, lets in-flight requests finish for up to `SHUTDOWN_GRACE_SECONDS`
(`timeout_graceful_shutdown`) and runs the lifespan shutdown, closing the pools.
With `SHUTDOWN_DRAIN_DELAY_SECONDS` > 0 the hand-over to uvicorn waits that long
on SIGTERM (the instance keeps serving, unready, so load balancers without a
preStop hook stop sending first); a second SIGTERM hands over at once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any


@dataclass(slots=True)
class Lifecycle:
    """When this instance started, and whether it is draining (readiness fails)."""

    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False


SignalHandler = Callable[[int, FrameType | None], Any]


class DrainOnSignal:
    """Calls `on_drain` at once on SIGTERM/SIGINT, then chains to the server's handler.

    Installs only when SIGTERM has a Python handler (the server's), and wraps only
    handlers the server installed; with the default dispositions in place there is
    no server to hand the signal to, and the hook stays out of the way. Must be
    installed from the main thread.
    """

    def __init__(
        self,
        on_drain: Callable[[], None],
        *,
        delay_seconds: float = 0.0,
        signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        self.on_drain = on_drain
        self.delay_seconds = delay_seconds
        self.signals = signals
        self._previous: dict[int, SignalHandler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handed_over: set[int] = set()
        self._delay_started = False

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        if not callable(signal.getsignal(signal.SIGTERM)):
            return False  # no server manages shutdown here (a test, a REPL)
        self._loop = asyncio.get_running_loop()
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if callable(previous) and previous is not signal.default_int_handler:
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self.installed

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.on_drain()
        loop = self._loop
        delay = signum == signal.SIGTERM and self.delay_seconds > 0 and not self._delay_started
        if delay and loop is not None:
            self._delay_started = True
            # Signal handlers run between bytecodes of the loop's thread; only the
            # thread-safe call is safe to make from here.
            loop.call_soon_threadsafe(
                loop.call_later, self.delay_seconds, self._hand_over, signum, None
            )
            return
        self._hand_over(signum, frame)

    def _hand_over(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGTERM:
            if signum in self._handed_over:  # the delayed hand-over after a second SIGTERM
                return
            self._handed_over.add(signum)
        previous = self._previous.get(signum)
        if previous is not None:
            previous(signum, frame)
