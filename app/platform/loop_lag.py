"""How late this process's event loop runs its callbacks: the measure of its own saturation.

Every latency this process measures is the upstream's time plus the time its
own loop took to get back to the reply. While the worker is CPU-bound, the
second part dominates fast calls: a moderation check that takes 5 ms at the
upstream reads as 100 ms. An adaptive limit that took that for upstream load
would shrink, queue callers and shed them down the ladder, although the
upstream is idle and fewer calls to it cannot help (`adaptive.GradientLimit`
uses `LoopLag.seconds` to hold its latency verdict meanwhile).

`LoopLag` sleeps `interval_seconds` at a time and keeps a smoothed average of
how much later than asked it woke up: near 0 on an idle loop, about the length
of one loop turn on a saturated one. It costs one timer per interval. The
lag is also reported (`story_event_loop_lag_seconds`, once a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from app.platform.background import stop_task

__all__ = ["LoopLag"]


class LoopLag:
    """The event loop's lag, sampled in a background task (`start` / `stop`)."""

    def __init__(
        self,
        interval_seconds: float = 0.05,
        smoothing: float = 0.3,
        *,
        report: Callable[[float], None] | None = None,
        report_every: int = 20,
    ) -> None:
        if interval_seconds <= 0 or not 0 < smoothing <= 1 or report_every < 1:
            raise ValueError("need interval_seconds > 0, 0 < smoothing <= 1, report_every >= 1")
        self.interval_seconds = interval_seconds
        self.smoothing = smoothing
        # Told the smoothed lag every `report_every` samples (the metric: once a second).
        self._report = report
        self._report_every = report_every
        self._samples = 0
        self._lag = 0.0
        self._task: asyncio.Task[None] | None = None

    def seconds(self) -> float:
        """The smoothed lag now (0.0 before the first sample, or when not started)."""
        return self._lag

    def record(self, late: float) -> None:
        self._lag += self.smoothing * (max(0.0, late) - self._lag)
        self._samples += 1
        if self._report is not None and self._samples % self._report_every == 0:
            self._report(self._lag)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sample(), name="loop-lag")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_seconds
            await asyncio.sleep(self.interval_seconds)
            self.record(loop.time() - asked)
