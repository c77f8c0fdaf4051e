"""Host and process figures for `/health` and `/metrics`, sampled off the request path.

psutil's CPU figure is a difference between two readings; asking for it with an
interval (`cpu_percent(interval=1)`) sleeps, which on the event loop would stall
every request. Instead a background task reads everything every few seconds in a
worker thread (`cpu_percent(interval=None)`: utilisation since the previous
reading) and keeps the last `SystemSample`; requests only read that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from app.core.metrics import record_system

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SystemSample:
    """One reading. `disk_percent` is None when the disk path could not be read."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float | None
    rss_bytes: int
    taken_at: float  # wall-clock seconds (time.time())


class SystemMonitor:
    """Samples CPU, memory, disk and this process's RSS every `interval_seconds`."""

    def __init__(self, *, interval_seconds: float = 5.0, disk_path: Path = Path("/")) -> None:
        self.interval_seconds = interval_seconds
        self.disk_path = disk_path
        self._process = psutil.Process()
        self._latest: SystemSample | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def latest(self) -> SystemSample | None:
        return self._latest

    def sample(self) -> SystemSample:
        """Read everything now (blocking, but short: call it from a thread)."""
        try:
            disk: float | None = psutil.disk_usage(str(self.disk_path)).percent
        except OSError:
            disk = None
        sample = SystemSample(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_percent=psutil.virtual_memory().percent,
            disk_percent=disk,
            rss_bytes=self._process.memory_info().rss,
            taken_at=time.time(),
        )
        record_system(
            rss_bytes=sample.rss_bytes,
            cpu_percent=sample.cpu_percent,
            memory_percent=sample.memory_percent,
            disk_percent=sample.disk_percent,
        )
        self._latest = sample
        return sample

    async def start(self) -> None:
        """Take a first reading (so `/health` has figures at once), then sample in a loop."""
        # The first cpu_percent(interval=None) has nothing to compare with and says 0.0;
        # this reading primes it and the loop's next one is meaningful.
        await asyncio.to_thread(self.sample)
        self._task = asyncio.create_task(self._run(), name="system-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await asyncio.to_thread(self.sample)
            except Exception as error:  # a failed reading waits for the next one
                logger.warning("system sample failed", extra={"error": repr(error)})
