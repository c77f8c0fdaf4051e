"""Breaker state in Redis when Redis answers within budget, in this process otherwise.

A breaker exists to keep a request fast when an upstream is not; it must not
make the request slow or fail when Redis is not. So every operation goes through
`app.platform.redis.RedisBudget`, the one way the service reaches Redis under a
time budget (the rate limiter and the story cache use it too): a Redis error or
overrun is answered by an in-process store, the process's `RedisGate` spares the
other parts the same wait, and Redis is probed again after a while. This module
only adds what is particular to breakers: permits granted in-process are settled
in-process, and the observer hears of the fallback and the recovery.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

from app.core.resilience.breaker import (
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    BreakerStore,
    Permit,
    Transition,
)
from app.core.resilience.observer import DEFAULT_OBSERVER, ResilienceObserver, notify_observer
from app.core.resilience.stores.memory import InMemoryBreakerStore
from app.platform.clock import SYSTEM_CLOCK, Clock
from app.platform.redis import RedisBudget, RedisGate

__all__ = ["FailoverBreakerStore"]

T = TypeVar("T")

_FALLBACK_ORIGIN = "fallback"


class _ObserverListener:
    """Tells the resilience observer what the Redis budget saw (a `BudgetListener`)."""

    def __init__(self, observer: ResilienceObserver) -> None:
        self._observer = observer

    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        # Every failure, not only the first: each one cost a request the budget.
        notify_observer(self._observer.store_fallback, error)

    def gate_closed(self) -> None:
        # Another part's failure, already reported by that part: counting it here
        # too would report one Redis outage as several.
        pass

    def recovered(self) -> None:
        notify_observer(self._observer.store_recovered)


class FailoverBreakerStore:
    """`primary` (Redis) within `budget_seconds`, else `fallback` (in-process).

    While degraded, operations go straight to the fallback until
    `retry_interval_seconds` have passed; then one operation tries the primary
    again. Permits granted by the fallback are settled there (so its probe leases are
    released), whatever the primary's state by then. This store never raises a
    store error: a request never fails because Redis did.
    """

    def __init__(
        self,
        primary: BreakerStore,
        fallback: BreakerStore | None = None,
        *,
        budget_seconds: float = 0.05,
        retry_interval_seconds: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        observer: ResilienceObserver = DEFAULT_OBSERVER,
        gate: RedisGate | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback if fallback is not None else InMemoryBreakerStore(clock=clock)
        self.observer = observer
        # Without the process's gate, a private one that never stays closed: then
        # `retry_interval_seconds` alone decides when Redis is tried again, as the
        # caller asked, rather than a one-second cool-down nobody else shares.
        self.budget = RedisBudget(
            budget_seconds=budget_seconds,
            retry_seconds=retry_interval_seconds,
            gate=gate if gate is not None else RedisGate(0.0, clock=clock),
            clock=clock,
            listener=_ObserverListener(observer),
        )

    @property
    def degraded(self) -> bool:
        """True while state is kept in-process although Redis is configured."""
        return self.budget.degraded

    @property
    def last_error(self) -> BaseException | None:
        """Why the store is degraded (None while it is not)."""
        return self.budget.last_error

    async def _run(
        self,
        operation: str,
        on_primary: Callable[[], Awaitable[T]],
        on_fallback: Callable[[], Awaitable[T]],
    ) -> tuple[T, bool]:
        """The operation's result, and whether the fallback produced it."""
        result, from_primary = await self.budget.run(on_primary, on_fallback, operation=operation)
        return result, not from_primary

    async def acquire(self, name: str, config: BreakerConfig) -> Admission:
        admission, from_fallback = await self._run(
            "acquire",
            lambda: self.primary.acquire(name, config),
            lambda: self.fallback.acquire(name, config),
        )
        if from_fallback and admission.permit is not None:
            permit = dataclasses.replace(admission.permit, origin=_FALLBACK_ORIGIN)
            admission = dataclasses.replace(admission, permit=permit)
        return admission

    async def on_success(self, permit: Permit, config: BreakerConfig) -> Transition | None:
        if permit.origin == _FALLBACK_ORIGIN:
            return await self.fallback.on_success(permit, config)
        transition, _ = await self._run(
            "on_success",
            lambda: self.primary.on_success(permit, config),
            lambda: self.fallback.on_success(permit, config),
        )
        return transition

    async def on_failure(
        self, permit: Permit, config: BreakerConfig, *, jitter: float = 1.0
    ) -> Transition | None:
        if permit.origin == _FALLBACK_ORIGIN:
            return await self.fallback.on_failure(permit, config, jitter=jitter)
        transition, _ = await self._run(
            "on_failure",
            lambda: self.primary.on_failure(permit, config, jitter=jitter),
            lambda: self.fallback.on_failure(permit, config, jitter=jitter),
        )
        return transition

    async def release(self, permit: Permit, config: BreakerConfig) -> None:
        if permit.origin == _FALLBACK_ORIGIN:
            await self.fallback.release(permit, config)
            return
        await self._run(
            "release",
            lambda: self.primary.release(permit, config),
            lambda: self.fallback.release(permit, config),
        )

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot:
        snapshot, from_fallback = await self._run(
            "snapshot",
            lambda: self.primary.snapshot(name, config),
            lambda: self.fallback.snapshot(name, config),
        )
        return dataclasses.replace(snapshot, store_degraded=from_fallback)
