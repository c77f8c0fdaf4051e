"""The operations side of one app instance: rate-limit counters, maintenance switch,
system sampler, Sentry, and the SIGTERM drain hook, built and wired in one place.

`create_app` builds `Operations` (no I/O) and hands its parts to the middleware;
the lifespan calls `start(state)` once Redis and the database are open, and
`stop()` at shutdown.

Graceful shutdown. uvicorn installs its own SIGTERM/SIGINT handlers (with
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
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from app.core.config import Settings
from app.core.maintenance import MaintenanceSwitch
from app.core.metrics import mark_process_dead, set_build_info
from app.core.security import (
    Counters,
    FailoverCounters,
    InProcessCounters,
    RateLimitPolicy,
    RedisCounters,
    TrustedProxies,
)
from app.core.sentry import init_sentry, shutdown_sentry
from app.core.system import SystemMonitor

if TYPE_CHECKING:
    from app.lifespan import AppState

logger = logging.getLogger(__name__)

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


class Operations:
    """Everything this module's docstring lists, for one app instance."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.settings = settings
        self.version = version
        self.trusted_proxies = TrustedProxies(settings.proxies.trusted_proxies)
        self.maintenance = MaintenanceSwitch(settings.maintenance)
        self.system = SystemMonitor(
            interval_seconds=settings.health.sample_interval_seconds,
            disk_path=settings.health.disk_path,
        )
        self.rate_counters: FailoverCounters | None = None
        self.rate_limits = RateLimitPolicy(settings.rate_limit, self.counters)
        self.sentry_enabled = False
        self._drain: DrainOnSignal | None = None

    def counters(self) -> Counters:
        """The rate-limit counters in use (in-process until `start` has run)."""
        if self.rate_counters is None:
            self.rate_counters = FailoverCounters(None, InProcessCounters())
        return self.rate_counters

    async def start(self, state: AppState) -> None:
        cfg = self.settings
        self.sentry_enabled = init_sentry(cfg, self.version)
        set_build_info(self.version)
        self.rate_counters = FailoverCounters(
            RedisCounters(state.redis) if state.redis is not None else None,
            InProcessCounters(),
            budget_seconds=cfg.rate_limit.redis_budget_ms / 1000,
            retry_seconds=cfg.rate_limit.redis_retry_seconds,
            gate=state.redis_gate,
        )
        await self.system.start()
        await self.maintenance.start(state.redis)

        loop = asyncio.get_running_loop()

        def drain() -> None:
            if not state.draining:
                state.draining = True
                # Logging takes locks: not from inside a signal handler.
                loop.call_soon_threadsafe(
                    logger.warning, "shutdown signal received: draining; readiness fails"
                )

        self._drain = DrainOnSignal(drain, delay_seconds=cfg.shutdown.drain_delay_seconds)
        self._drain.install()

    async def stop(self) -> None:
        if self._drain is not None:
            self._drain.uninstall()
        await self.maintenance.stop()
        await self.system.stop()
        mark_process_dead()
        if self.sentry_enabled:
            shutdown_sentry()
