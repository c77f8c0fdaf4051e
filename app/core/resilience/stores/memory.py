"""Breaker state in this process only: the default, and the fallback when Redis fails.

Each operation runs without an `await` in between its reads and writes, so it is
atomic on the event loop with no lock. Times come from the injected clock's
`monotonic()`. The rules are those of the Redis script
(`app.core.resilience.stores.redis`); the same breaker tests run against both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.core.resilience.breaker import (
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    Permit,
    Transition,
    new_lease_id,
)
from app.core.resilience.observer import BreakerState
from app.platform.clock import SYSTEM_CLOCK, Clock

__all__ = ["InMemoryBreakerStore"]

_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@dataclass(slots=True)
class _Record:
    state: BreakerState = _CLOSED
    failures: int = 0
    opened_until: float = 0.0
    open_count: int = 0
    epoch: int = 0
    leases: dict[str, float] = field(default_factory=dict)


class InMemoryBreakerStore:
    """Breaker state of this process only (the same rules as the Redis script)."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}

    async def acquire(self, name: str, config: BreakerConfig) -> Admission:
        record = self._records.setdefault(name, _Record())
        now = self._clock.monotonic()
        transition = None
        if record.state is _OPEN:
            if now < record.opened_until:
                return Admission(None, record.opened_until - now)
            record.state = _HALF_OPEN
            record.epoch += 1
            transition = Transition(_OPEN, _HALF_OPEN)
        if record.state is _HALF_OPEN:
            record.leases = {lease: end for lease, end in record.leases.items() if end > now}
            if len(record.leases) < config.half_open_max_calls:
                lease_id = new_lease_id()
                record.leases[lease_id] = now + config.probe_lease_seconds
                permit = Permit(name, probe=True, epoch=record.epoch, lease_id=lease_id)
                return Admission(permit, transition=transition)
            return Admission(None, min(record.leases.values()) - now, transition)
        return Admission(Permit(name, epoch=record.epoch, clean=record.failures == 0))

    async def on_success(self, permit: Permit, config: BreakerConfig) -> Transition | None:
        record = self._records.get(permit.name)
        if record is None or record.epoch != permit.epoch:
            return None
        if record.state is _CLOSED:
            record.failures = 0
        elif record.state is _HALF_OPEN and permit.probe:
            record.state = _CLOSED
            record.failures = 0
            record.open_count = 0
            record.epoch += 1
            record.leases.clear()
            return Transition(_HALF_OPEN, _CLOSED)
        return None

    async def on_failure(
        self, permit: Permit, config: BreakerConfig, *, jitter: float = 1.0
    ) -> Transition | None:
        record = self._records.get(permit.name)
        if record is None or record.epoch != permit.epoch:
            return None
        if record.state is _CLOSED:
            record.failures += 1
            if record.failures >= config.failure_threshold:
                return self._open(record, config, jitter)
        elif record.state is _HALF_OPEN and permit.probe:
            record.failures += 1
            return self._open(record, config, jitter)
        return None

    async def release(self, permit: Permit, config: BreakerConfig) -> None:
        record = self._records.get(permit.name)
        if record is not None and record.epoch == permit.epoch and permit.lease_id:
            record.leases.pop(permit.lease_id, None)

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot:
        record = self._records.get(name) or _Record()
        now = self._clock.monotonic()
        return BreakerSnapshot(
            name=name,
            state=record.state,
            consecutive_failures=record.failures,
            opened_until_seconds_from_now=(
                max(0.0, record.opened_until - now) if record.state is _OPEN else None
            ),
            open_count=record.open_count,
            probes_in_flight=sum(1 for end in record.leases.values() if end > now),
        )

    def _open(self, record: _Record, config: BreakerConfig, jitter: float) -> Transition:
        previous = record.state
        record.open_count += 1
        record.opened_until = self._clock.monotonic() + config.open_seconds(
            record.open_count, jitter
        )
        record.state = _OPEN
        record.epoch += 1
        record.leases.clear()
        return Transition(previous, _OPEN)
