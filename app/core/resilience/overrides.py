"""Operator overrides of circuit breakers: force one open or closed, on every replica.

During an incident an operator may know better than the failure count: an
upstream is returning plausible garbage (force it open: the ladder serves from
the next rung at once), or a breaker keeps opening on a known-harmless error
(force it closed: calls flow whatever they return). `python -m app.breakers`
writes an override with an expiry and a reason into one Redis hash; every
process reads that hash every second (`OverrideSync`) into its own
`BreakerOverrides`, which `OverridingBreakerStore` consults without I/O on each
call. An override always expires (at most `MAX_OVERRIDE_SECONDS`): a forgotten
one cannot pin a breaker for ever. While Redis cannot be read, each process
keeps the overrides it last saw, until they expire.

Forced open: `acquire` refuses (`CircuitOpenError` with the time left), nothing
is called or counted. Forced closed: every call is admitted and its outcome is
not counted, so the breaker cannot open; the shared state is left as it was and
resumes when the override ends. `/health` shows a forced breaker as such.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from app.core.resilience.breaker import (
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    BreakerStore,
    Permit,
    Transition,
)
from app.core.resilience.observer import BreakerState

logger = logging.getLogger(__name__)

OVERRIDES_KEY = "story:breaker-overrides"
MAX_OVERRIDE_SECONDS = 24 * 3600.0
_FORCED = "forced"  # the origin of a permit a forced-closed breaker gave out


@dataclass(frozen=True, slots=True)
class Override:
    state: BreakerState  # OPEN or CLOSED
    until: float  # epoch seconds (wall clock: it is compared on every replica)
    reason: str = ""

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)

    def describe(self, now: float) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"forced {self.state.value} by an operator for {self.remaining(now):.0f} s{why}"

    def encode(self) -> str:
        return json.dumps({"state": self.state.value, "until": self.until, "reason": self.reason})

    @staticmethod
    def decode(text: str | bytes) -> Override | None:
        try:
            data: Any = json.loads(text)
            state = BreakerState(data["state"])
            if state not in (BreakerState.OPEN, BreakerState.CLOSED):
                return None
            return Override(state, float(data["until"]), str(data.get("reason", ""))[:200])
        except (ValueError, KeyError, TypeError):
            return None  # a malformed entry overrides nothing


class BreakerOverrides:
    """This process's copy of the overrides, read without I/O."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._overrides: dict[str, Override] = {}

    def replace_all(self, overrides: Mapping[str, Override]) -> None:
        self._overrides = dict(overrides)

    def current(self, name: str) -> Override | None:
        override = self._overrides.get(name)
        if override is None or override.remaining(self._clock()) <= 0:
            return None
        return override

    def now(self) -> float:
        return self._clock()


class OverridingBreakerStore:
    """A `BreakerStore` that applies the overrides before the store it wraps."""

    def __init__(self, inner: BreakerStore, overrides: BreakerOverrides) -> None:
        self.inner = inner
        self.overrides = overrides

    async def acquire(self, name: str, config: BreakerConfig) -> Admission:
        override = self.overrides.current(name)
        if override is None:
            return await self.inner.acquire(name, config)
        if override.state is BreakerState.OPEN:
            return Admission(None, retry_after=override.remaining(self.overrides.now()))
        return Admission(Permit(name, origin=_FORCED))

    async def on_success(self, permit: Permit, config: BreakerConfig) -> Transition | None:
        if permit.origin == _FORCED:
            return None
        return await self.inner.on_success(permit, config)

    async def on_failure(
        self, permit: Permit, config: BreakerConfig, *, jitter: float = 1.0
    ) -> Transition | None:
        if permit.origin == _FORCED:
            return None
        return await self.inner.on_failure(permit, config, jitter=jitter)

    async def release(self, permit: Permit, config: BreakerConfig) -> None:
        if permit.origin != _FORCED:
            await self.inner.release(permit, config)

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot:
        snapshot = await self.inner.snapshot(name, config)
        override = self.overrides.current(name)
        if override is None:
            return snapshot
        now = self.overrides.now()
        is_open = override.state is BreakerState.OPEN
        return replace(
            snapshot,
            state=override.state,
            opened_until_seconds_from_now=override.remaining(now) if is_open else None,
            forced=override.describe(now),
        )


async def read_overrides(redis: Redis) -> dict[str, Override]:
    entries = await redis.hgetall(OVERRIDES_KEY)
    found: dict[str, Override] = {}
    for name, text in entries.items():
        override = Override.decode(text)
        if override is not None:
            key = name.decode() if isinstance(name, bytes) else str(name)
            found[key] = override
    return found


async def write_override(redis: Redis, name: str, override: Override | None) -> None:
    """Sets (or with None, clears) `name`'s override; expired entries are dropped."""
    if override is None:
        await redis.hdel(OVERRIDES_KEY, name)
    else:
        await redis.hset(OVERRIDES_KEY, name, override.encode())
    now = time.time()
    stale = [n for n, o in (await read_overrides(redis)).items() if o.remaining(now) <= 0]
    if stale:
        await redis.hdel(OVERRIDES_KEY, *stale)


class OverrideSync:
    """One step of the sync loop: reads the shared overrides into this process's copy.

    A Redis that does not answer leaves the copy as it is (its overrides still
    expire by themselves); the caller runs it every second (`background.every`).
    """

    def __init__(
        self, redis: Redis, overrides: BreakerOverrides, *, timeout_seconds: float = 0.5
    ) -> None:
        self.redis = redis
        self.overrides = overrides
        self.timeout_seconds = timeout_seconds
        self.failing = False

    async def __call__(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                found = await read_overrides(self.redis)
        except Exception as error:
            if not self.failing:  # once per outage, not every second
                logger.warning(
                    "breaker overrides cannot be read; keeping the last ones",
                    extra={"error": repr(error)},
                )
            self.failing = True
            return
        if self.failing:
            logger.info("breaker overrides readable again")
        self.failing = False
        previous = {n: o for n in found if (o := self.overrides.current(n)) is not None}
        self.overrides.replace_all(found)
        for name, override in found.items():
            if previous.get(name) != override:
                logger.warning(
                    "breaker override in force",
                    extra={"breaker": name, "override": override.describe(time.time())},
                )
