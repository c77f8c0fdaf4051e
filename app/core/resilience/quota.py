"""The upstream quota governor: an account's requests and tokens per minute, spent
by the whole fleet through Redis, so no worker earns a 429 the fleet could foresee.

A provider account has limits (OpenAI: requests and tokens per minute). Every
worker of every replica spends the same account, so the governor keeps two token
buckets per account in Redis, refilled continuously (a minute's worth is the
capacity, `limit / 60` per second the rate), and spends them in ONE atomic Lua
call per upstream call, on Redis's clock (`TIME`), so processes with skewed
clocks agree:

- a call *reserves* one request and its estimated tokens (the request's maximum:
  prompt plus the longest answer it asks for). The buckets may go into debt; the
  reservation says how long the caller must wait until the debt is paid, and
  callers are served in the order they reserved (no herd of retries);
- a call that would have to wait longer than it may (its deadline less the
  rung's floor) reserves nothing and is refused (`QuotaExhaustedError`, with the
  bucket that is spent as the reason): its rung goes down the ladder at once;
- after the reply, the estimate is corrected by the usage the reply reports;
  a call that never reached the upstream (shed by the bulkhead, refused by the
  breaker, cut before it was sent) gives its reservation back.

Redis within a budget (`app.platform.redis.RedisBudget`, the process's
`RedisGate`): when Redis fails or is slow, the process spends in-process buckets
holding `local_share` of each limit (the operator sets it to about one over the
number of processes), and returns to Redis by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from app.core.resilience.deadline import current_deadline
from app.core.resilience.errors import QuotaExhaustedError
from app.platform.clock import SYSTEM_CLOCK, Clock
from app.platform.redis import RedisBudget, RedisGate, describe_error

__all__ = [
    "InProcessBuckets",
    "QuotaEvents",
    "QuotaGovernor",
    "QuotaLimits",
    "RedisBuckets",
    "Reservation",
]

logger = logging.getLogger(__name__)

#: The longest a caller without a deadline waits for quota.
NO_DEADLINE_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Per minute; None: that dimension is not limited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for value in (self.requests_per_minute, self.tokens_per_minute):
            if value is not None and value < 1:
                raise ValueError("a quota is at least 1 per minute (None: no quota)")

    @property
    def any(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def scaled(self, share: float) -> QuotaLimits:
        def part(value: int | None) -> int | None:
            return None if value is None else max(1, math.floor(value * share))

        return QuotaLimits(part(self.requests_per_minute), part(self.tokens_per_minute))


@dataclass(frozen=True, slots=True)
class Grant:
    """A bucket's answer: reserved or not, the wait it implies, the bucket that set it."""

    granted: bool
    wait: float
    spent: str  # "requests", "tokens" or "" (nothing to wait for)


@dataclass(slots=True)
class Reservation:
    name: str
    tokens: int
    wait: float
    shared: bool  # reserved in Redis (False: in this process)


class Buckets(Protocol):
    async def reserve(
        self, key: str, limits: QuotaLimits, tokens: int, max_wait: float
    ) -> Grant: ...

    async def adjust(self, key: str, limits: QuotaLimits, requests: float, tokens: float) -> None:
        """Give back (positive) or charge more (negative) requests and tokens."""


class InProcessBuckets:
    """The same buckets in this process's memory (no Redis, or Redis failing)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._levels: dict[str, tuple[float, float, float]] = {}

    def _refilled(self, key: str, limits: QuotaLimits) -> tuple[float, float]:
        rpm = limits.requests_per_minute or 0
        tpm = limits.tokens_per_minute or 0
        now = self._clock.monotonic()
        requests, tokens, at = self._levels.get(key, (float(rpm), float(tpm), now))
        elapsed = max(0.0, now - at)
        return min(rpm, requests + elapsed * rpm / 60), min(tpm, tokens + elapsed * tpm / 60)

    async def reserve(self, key: str, limits: QuotaLimits, tokens: int, max_wait: float) -> Grant:
        requests_level, tokens_level = self._refilled(key, limits)
        requests_level -= 1
        tokens_level -= tokens
        wait, spent = 0.0, ""
        if limits.requests_per_minute and requests_level < 0:
            wait, spent = -requests_level * 60 / limits.requests_per_minute, "requests"
        if limits.tokens_per_minute and tokens_level < 0:
            tokens_wait = -tokens_level * 60 / limits.tokens_per_minute
            if tokens_wait > wait:
                wait, spent = tokens_wait, "tokens"
        if wait > max_wait:
            return Grant(False, wait, spent)
        self._levels[key] = (requests_level, tokens_level, self._clock.monotonic())
        return Grant(True, wait, spent)

    async def adjust(self, key: str, limits: QuotaLimits, requests: float, tokens: float) -> None:
        requests_level, tokens_level = self._refilled(key, limits)
        self._levels[key] = (
            min(float(limits.requests_per_minute or 0), requests_level + requests),
            min(float(limits.tokens_per_minute or 0), tokens_level + tokens),
            self._clock.monotonic(),
        )


# KEYS[1]: the account's hash {r, t, ts}. Levels refill at limit/60000 per ms up to the
# limit, on Redis's clock. ARGV reserve: 'reserve', rpm, tpm, tokens, max_wait_ms
# (0 per minute: not limited) -> {granted 0/1, wait_ms, spent 0 none/1 requests/2 tokens}.
# ARGV adjust: 'adjust', rpm, tpm, requests, tokens (added, capped at the limit) -> {1, 0, 0}.
_BUCKETS_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local r = tonumber(state[1]) or rpm
local t = tonumber(state[2]) or tpm
local elapsed = math.max(0, now - (tonumber(state[3]) or now))
r = math.min(rpm, r + elapsed * rpm / 60000)
t = math.min(tpm, t + elapsed * tpm / 60000)
local wait, spent = 0, 0
if ARGV[1] == 'reserve' then
  r = r - 1
  t = t - tonumber(ARGV[4])
  if rpm > 0 and r < 0 then wait, spent = -r * 60000 / rpm, 1 end
  if tpm > 0 and t < 0 and -t * 60000 / tpm > wait then wait, spent = -t * 60000 / tpm, 2 end
  if wait > tonumber(ARGV[5]) then return {0, math.ceil(wait), spent} end
else
  r = math.min(rpm, r + tonumber(ARGV[4]))
  t = math.min(tpm, t + tonumber(ARGV[5]))
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(t), 'ts', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return {1, math.ceil(wait), spent}
"""

_SPENT = {0: "", 1: "requests", 2: "tokens"}


class RedisBuckets:
    """The buckets in Redis, shared by every process: one script call each.
    Keys read `story:quota:{<account>}` (a Redis Cluster hash tag)."""

    KEY_PREFIX = "story:quota:"

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_BUCKETS_LUA)

    def key(self, name: str) -> str:
        return f"{self.KEY_PREFIX}{{{name}}}"

    async def _call(self, name: str, *args: Any) -> list[int]:
        reply = await self._script(keys=[self.key(name)], args=list(args))
        return [int(value) for value in reply]

    async def reserve(self, key: str, limits: QuotaLimits, tokens: int, max_wait: float) -> Grant:
        rpm, tpm = limits.requests_per_minute or 0, limits.tokens_per_minute or 0
        max_wait_ms = math.floor(max_wait * 1000)
        granted, wait_ms, spent = await self._call(key, "reserve", rpm, tpm, tokens, max_wait_ms)
        return Grant(bool(granted), wait_ms / 1000, _SPENT.get(spent, ""))

    async def adjust(self, key: str, limits: QuotaLimits, requests: float, tokens: float) -> None:
        rpm, tpm = limits.requests_per_minute or 0, limits.tokens_per_minute or 0
        await self._call(key, "adjust", rpm, tpm, requests, tokens)


class QuotaEvents(Protocol):
    """What the governor did (metrics); synchronous, cheap, must not raise."""

    def waited(self, name: str, seconds: float) -> None: ...

    def refused(self, name: str, reason: str) -> None: ...

    def storage(self, name: str, degraded: bool, redis_error: bool) -> None: ...


class _NoEvents:
    def waited(self, name: str, seconds: float) -> None:
        pass

    def refused(self, name: str, reason: str) -> None:
        pass

    def storage(self, name: str, degraded: bool, redis_error: bool) -> None:
        pass


Sleep = Callable[[float], Awaitable[None]]


class QuotaGovernor:
    """One provider account's quota (module doc). `acquire` before the call,
    `settle` after it."""

    def __init__(
        self,
        name: str,
        limits: QuotaLimits,
        *,
        redis: RedisBuckets | None = None,
        budget_seconds: float = 0.05,
        retry_seconds: float = 5.0,
        gate: RedisGate | None = None,
        local_share: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Sleep = asyncio.sleep,
        events: QuotaEvents | None = None,
    ) -> None:
        if not limits.any:
            raise ValueError("a governor needs a requests or tokens limit")
        if not 0 < local_share <= 1:
            raise ValueError("local_share must be in (0, 1]")
        self.name = name
        self.limits = limits
        self.local_limits = limits.scaled(local_share)
        self.redis = redis
        self.local = InProcessBuckets(clock)
        self.events: QuotaEvents = events or _NoEvents()
        self._sleep = sleep
        self._pending: set[asyncio.Task[None]] = set()
        self.budget = RedisBudget(
            budget_seconds=budget_seconds,
            retry_seconds=retry_seconds,
            gate=gate,
            clock=clock,
            listener=_StorageEvents(self),
        )

    @property
    def shared(self) -> bool:
        return self.redis is not None and not self.budget.degraded

    async def acquire(self, tokens: int, reserve_seconds: float = 0.0) -> Reservation:
        """Reserve one request and `tokens`, and wait until they may be spent; or raise
        `QuotaExhaustedError` at once when that wait would not leave `reserve_seconds`
        before the deadline."""
        deadline = current_deadline()
        max_wait = NO_DEADLINE_WAIT if deadline is None else deadline.remaining() - reserve_seconds
        max_wait = max(0.0, max_wait)
        grant, shared = await self._spend(
            lambda b, limits: b.reserve(self.name, limits, tokens, max_wait)
        )
        if not grant.granted:
            reason = grant.spent or "spent"
            self.events.refused(self.name, reason)
            logger.warning(
                "quota %s: %s per minute spent; next call in %.1f s, more than the %.1f s "
                "this call may wait: down the ladder",
                self.name,
                reason,
                grant.wait,
                max_wait,
                extra={"upstream": self.name, "reason": reason},
            )
            raise QuotaExhaustedError(self.name, grant.wait, reason=reason)
        reservation = Reservation(self.name, tokens, grant.wait, shared)
        if grant.wait > 0:
            self.events.waited(self.name, grant.wait)
            try:
                await self._sleep(grant.wait)
            except BaseException:
                self.settle_soon(reservation, sent=False)
                raise
        return reservation

    def settle_soon(
        self, reservation: Reservation, *, sent: bool, used_tokens: int | None = None
    ) -> None:
        """Correct the reservation in the background (the caller does not wait for it):
        unsent, everything back; sent, tokens corrected by `used_tokens` when known."""
        if sent and (used_tokens is None or used_tokens == reservation.tokens):
            return
        requests = 0.0 if sent else 1.0
        tokens = float(reservation.tokens - (used_tokens or 0)) if sent else reservation.tokens
        task = asyncio.ensure_future(self._adjust(requests, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settled(self) -> None:
        """Wait for the corrections under way (tests; the end of a benchmark)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _adjust(self, requests: float, tokens: float) -> None:
        await self._spend(lambda b, limits: b.adjust(self.name, limits, requests, tokens))

    async def _spend(
        self, use: Callable[[Buckets, QuotaLimits], Awaitable[Any]]
    ) -> tuple[Any, bool]:
        redis = self.redis
        if redis is None:
            return await use(self.local, self.limits), False
        return await self.budget.run(
            lambda: use(redis, self.limits),
            lambda: use(self.local, self.local_limits),
            operation="quota",
        )


class _StorageEvents:
    """The governor's storage changes, as logs and metrics."""

    def __init__(self, governor: QuotaGovernor) -> None:
        self.governor = governor

    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        if first:
            self.governor.events.storage(self.governor.name, True, True)
            logger.warning(
                "quota %s: Redis failed; spending this process's share",
                self.governor.name,
                extra={"error": describe_error(error)},
            )

    def gate_closed(self) -> None:
        self.governor.events.storage(self.governor.name, True, False)
        logger.warning(
            "quota %s: Redis gate closed; spending this process's share",
            self.governor.name,
            extra={"error": "another part of this process saw Redis fail"},
        )

    def recovered(self) -> None:
        self.governor.events.storage(self.governor.name, False, False)
        logger.info("quota %s: Redis answers again; the quota is shared", self.governor.name)
