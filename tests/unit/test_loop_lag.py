"""The event loop's lag: near zero while the loop is free, the stall when it is not."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.platform.loop_lag import LoopLag


async def test_a_stalled_loop_shows_as_lag_and_a_free_one_lets_it_fade() -> None:
    lag = LoopLag(interval_seconds=0.01, smoothing=1.0)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        # A CPU-bound callback holds the loop for 0.2 s, then we look once the loop
        # has run the sampler's (long overdue) wake-up.
        asyncio.get_running_loop().call_soon(time.sleep, 0.2)
        await asyncio.sleep(0.02)
        stalled = lag.seconds()
        for _ in range(100):  # free again: the next samples are on time
            await asyncio.sleep(0.02)
            if lag.seconds() < stalled / 2:
                break
        faded = lag.seconds()
    finally:
        await lag.stop()

    # The sampler woke at least 0.2 s - its interval late: a lower bound the sleep guarantees.
    assert stalled >= 0.15
    assert faded < stalled / 2


def test_the_average_smooths_samples_and_ignores_early_wakeups() -> None:
    lag = LoopLag(smoothing=0.5)
    lag.record(0.1)
    halfway = lag.seconds()
    lag.record(-0.01)  # a timer may fire a hair early: that is no lag, not negative lag

    assert halfway == pytest.approx(0.05)
    assert lag.seconds() == pytest.approx(0.025)


def test_not_started_reads_no_lag() -> None:
    assert LoopLag().seconds() == 0.0


def test_the_lag_is_reported_every_so_many_samples() -> None:
    reported: list[float] = []
    lag = LoopLag(smoothing=1.0, report=reported.append, report_every=2)
    for late in (0.1, 0.2, 0.3, 0.4, 0.5):
        lag.record(late)

    assert reported == [0.2, 0.4]
