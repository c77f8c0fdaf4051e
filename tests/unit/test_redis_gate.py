"""RedisGate: one process-wide view of whether Redis answers."""

from __future__ import annotations

from app.core.resilience.testing import FakeClock
from app.platform.redis import RedisGate


def test_the_gate_starts_open() -> None:
    assert RedisGate(clock=FakeClock()).is_open()


def test_a_failure_closes_the_gate_for_the_cool_down_only() -> None:
    clock = FakeClock()
    gate = RedisGate(1.0, clock=clock)

    gate.report_failure()
    closed_at_once = not gate.is_open()
    clock.advance(0.99)
    still_closed = not gate.is_open()
    clock.advance(0.02)

    assert closed_at_once
    assert still_closed
    assert gate.is_open()


def test_a_later_failure_extends_but_never_shortens_the_closed_time() -> None:
    clock = FakeClock()
    gate = RedisGate(1.0, clock=clock)

    gate.report_failure()
    clock.advance(0.5)
    gate.report_failure()
    clock.advance(0.9)

    assert not gate.is_open()
