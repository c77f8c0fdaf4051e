"""Counting requests per client in fixed windows: in Redis, shared by every
process, or in this process when Redis is not there.

- `RedisCounters`: one fixed window per client, route and limit, in Redis, ONE
  round trip per request (a Lua script: INCRBY, set the window's expiry, return
  count and time left; the same algorithm as `limits`' fixed window, which needs
  three round trips to also return the header figures). The keys of one call
  share a hash tag (`{client|route}`), so the script also runs on Redis Cluster.
- `InProcessCounters`: `limits.aio`'s `MemoryStorage` with its fixed-window
  strategy, in this process.
- `FailoverCounters`: Redis within the budget (`RATE_LIMIT_REDIS_BUDGET_MS`),
  in-process when Redis fails or is slow, by way of `app.platform.redis.RedisBudget`
  (after a failure, in-process for `RATE_LIMIT_REDIS_RETRY_SECONDS`, then one
  request tries Redis again; in-process too while the process's `RedisGate` is
  closed): a dead or silent Redis costs at most one budget per process per retry
  period, never a 500, never a hang.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.asyncio import Redis

from app.platform.clock import SYSTEM_CLOCK, Clock
from app.platform.metrics import record_rate_limit_storage
from app.platform.redis import RedisBudget, RedisGate, describe_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One limit after counting this request."""

    item: RateLimitItem
    allowed: bool
    remaining: int
    reset_at: float  # Unix time at which the window's count starts again

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.reset_at - now))


#: What a limit counts: one scope for every item of a call (a route), or one per item
#: (a route's limits and the client's limit across the API, counted together).
Scope = str | Sequence[str]


def scopes_of(items: Sequence[RateLimitItem], scope: Scope) -> list[str]:
    if isinstance(scope, str):
        return [scope] * len(items)
    if len(scope) != len(items):
        raise ValueError("one scope per item, or one for all")
    return list(scope)


class Counters(Protocol):
    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: Scope
    ) -> list[WindowResult]: ...


class InProcessCounters:
    """`limits.aio` fixed windows in this process's memory."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.strategy = FixedWindowRateLimiter(self.storage)

    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: Scope
    ) -> list[WindowResult]:
        results: list[WindowResult] = []
        for item, item_scope in zip(items, scopes_of(items, scope), strict=True):
            allowed = await self.strategy.hit(item, client, item_scope)
            reset_at, remaining = await self.strategy.get_window_stats(item, client, item_scope)
            results.append(WindowResult(item, allowed, remaining, reset_at))
        return results


# KEYS[i]: one counter per limit. ARGV[1]: cost; ARGV[1 + i]: window of KEYS[i], seconds.
# Returns count and milliseconds left for each key, in one round trip.
_FIXED_WINDOW_LUA = """
local cost = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCRBY', key, cost)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('EXPIRE', key, ARGV[i + 1])
    ttl = tonumber(ARGV[i + 1]) * 1000
  end
  out[#out + 1] = count
  out[#out + 1] = ttl
end
return out
"""


def _tag_text(value: str) -> str:
    """`value` with no brace left in it (Redis Cluster ends a hash tag at the first `}`)."""
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


async def preload_rate_limit_script(redis: Redis) -> None:
    """Loads the rate-limit script into Redis, so the first call needs no second trip."""
    await redis.script_load(_FIXED_WINDOW_LUA)


class RedisCounters:
    """Fixed windows in Redis, shared by every process: one script call per request.

    Keys read `story:ratelimit:{<client>}:<scope>:<amount>/<multiples>/<unit>`: the
    part in braces is a Redis Cluster hash tag, so every key of one client (its
    route's limits and its limit across the API, which one script call touches
    together) lives in one slot.
    """

    KEY_PREFIX = "story:ratelimit:"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(_FIXED_WINDOW_LUA)

    def key(self, item: RateLimitItem, client: str, scope: str) -> str:
        window = f"{item.amount}/{item.multiples}/{item.GRANULARITY.name}"
        return f"{self.KEY_PREFIX}{{{_tag_text(client)}}}:{_tag_text(scope)}:{window}"

    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: Scope
    ) -> list[WindowResult]:
        keys = [
            self.key(item, client, item_scope)
            for item, item_scope in zip(items, scopes_of(items, scope), strict=True)
        ]
        reply = await self._script(keys=keys, args=[1, *(item.get_expiry() for item in items)])
        now = time.time()
        results: list[WindowResult] = []
        for index, item in enumerate(items):
            count, ttl_ms = int(reply[2 * index]), int(reply[2 * index + 1])
            results.append(
                WindowResult(
                    item,
                    allowed=count <= item.amount,
                    remaining=max(0, item.amount - count),
                    reset_at=now + ttl_ms / 1000,
                )
            )
        return results


class FailoverCounters:
    """Redis within a hard time budget; in-process counters when Redis fails or is slow.

    The failover itself is `RedisBudget`'s (see `app.platform.redis`); this class
    says what it means for the limiter: counts are shared (`shared`) or per
    process (`degraded`), and each change is logged and counted.
    """

    def __init__(
        self,
        redis: RedisCounters | None,
        local: InProcessCounters,
        *,
        budget_seconds: float = 0.05,
        retry_seconds: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        gate: RedisGate | None = None,
    ) -> None:
        self.redis = redis
        self.local = local
        self.budget = RedisBudget(
            budget_seconds=budget_seconds,
            retry_seconds=retry_seconds,
            gate=gate,
            clock=clock,
            listener=_StorageEvents(),
        )

    @property
    def shared(self) -> bool:
        """True when counts are shared through Redis right now."""
        return self.redis is not None and not self.budget.degraded

    @property
    def degraded(self) -> bool:
        """True when Redis is configured but this process is counting in memory."""
        return self.redis is not None and self.budget.degraded

    @property
    def last_error(self) -> str | None:
        error = self.budget.last_error
        return None if error is None else describe_error(error)

    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: Scope
    ) -> list[WindowResult]:
        redis = self.redis
        if redis is None:
            return await self.local.hit(items, client, scope)
        results, _ = await self.budget.run(
            lambda: redis.hit(items, client, scope),
            lambda: self.local.hit(items, client, scope),
            operation="rate_limit",
        )
        return results


class _StorageEvents:
    """The limiter's storage changes, as logs and metrics."""

    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        if first:
            record_rate_limit_storage(degraded=True)
            logger.warning(
                "rate limit storage: Redis failed; counting in this process",
                extra={"error": describe_error(error)},
            )

    def gate_closed(self) -> None:
        record_rate_limit_storage(degraded=True, redis_error=False)
        logger.warning(
            "rate limit storage: Redis gate closed; counting in this process",
            extra={"error": "another part of this process saw Redis fail"},
        )

    def recovered(self) -> None:
        record_rate_limit_storage(degraded=False)
        logger.info("rate limit storage: Redis answers again; counts are shared")
