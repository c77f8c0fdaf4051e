"""Where circuit-breaker state lives: in this process, in Redis, or in Redis with a fallback.

`CircuitBreaker` (`app.core.resilience`) decides nothing itself: each operation on
a `BreakerStore` applies one atomic step of the state machine and returns the
transition it caused, if any, so the caller reports it exactly once.

- `InMemoryBreakerStore`: per process. Each operation runs without an `await`, so
  it is atomic on the event loop; times come from the injected clock's `monotonic()`.
- `RedisBreakerStore`: shared by every worker and replica. Each operation is ONE
  round trip: a Lua script (one hash per breaker) that reads the state, decides with
  Redis server `TIME` (replicas with skewed clocks agree) and writes the outcome.
  Probe leases are `lease:<id> -> expiry_ms` fields of the same hash. A store built
  with a `clock` passes `clock.time()` to the script as "now" instead of `TIME`;
  that is for tests with a `FakeClock` only. Needs Redis >= 5 (script effects
  replication, so `TIME` may precede writes). After a Redis restart the first call
  costs two extra round trips (`NOSCRIPT` -> `SCRIPT LOAD`).
- `FailoverBreakerStore`: Redis under a hard time budget; when Redis errors or is
  silent, the same operation runs on an in-process store, the store is marked
  `degraded`, and `observer.store_fallback` is told. Redis is tried again after
  `retry_interval_seconds`; once it answers, state is shared again.

The Redis client must fail fast, or the budget is useless: redis-py's defaults (5 s
socket timeouts, and from redis-py 6 three retries with backoff) turn a silent
Redis into many seconds per call. Create it with millisecond timeouts and no retry::

    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = Redis.from_url(
        url,
        socket_timeout=0.05,
        socket_connect_timeout=0.1,
        retry=Retry(NoBackoff(), 0),
    )
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from redis.asyncio import Redis

from app.core.resilience import (
    DEFAULT_OBSERVER,
    SYSTEM_CLOCK,
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    BreakerState,
    Clock,
    Permit,
    ResilienceObserver,
    Transition,
    notify_observer,
)

__all__ = [
    "BreakerStore",
    "FailoverBreakerStore",
    "InMemoryBreakerStore",
    "RedisBreakerStore",
]

T = TypeVar("T")

_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class BreakerStore(Protocol):
    """One atomic step of the breaker state machine per method.

    `on_failure`'s `jitter` (about 0.9..1.1) scales a lengthened open time; it is
    drawn by the breaker so that stores stay deterministic.
    """

    async def acquire(self, name: str, config: BreakerConfig) -> Admission: ...

    async def on_success(self, permit: Permit, config: BreakerConfig) -> Transition | None: ...

    async def on_failure(
        self, permit: Permit, config: BreakerConfig, *, jitter: float = 1.0
    ) -> Transition | None: ...

    async def release(self, permit: Permit, config: BreakerConfig) -> None: ...

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot: ...


def _new_lease_id() -> str:
    return secrets.token_hex(8)


# --- in process -------------------------------------------------------------------


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
                lease_id = _new_lease_id()
                record.leases[lease_id] = now + config.probe_lease_seconds
                permit = Permit(name, probe=True, epoch=record.epoch, lease_id=lease_id)
                return Admission(permit, transition=transition)
            return Admission(None, min(record.leases.values()) - now, transition)
        return Admission(Permit(name, epoch=record.epoch))

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


# --- Redis ------------------------------------------------------------------------

# KEYS[1]: the breaker's hash {state, failures, opened_until, open_count, epoch,
# lease:<id> = expiry}; all times in milliseconds.
# ARGV: op, now_ms ('' = server TIME), threshold, recovery_ms, max_recovery_ms,
# multiplier, max_probes, lease_ms, jitter, ttl_ms, permit_epoch, lease_id, probe.
# Keep in step with InMemoryBreakerStore: the same tests run against both.
_BREAKER_LUA = """
local key = KEYS[1]
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local threshold = tonumber(ARGV[3])
local recovery = tonumber(ARGV[4])
local max_recovery = tonumber(ARGV[5])
local multiplier = tonumber(ARGV[6])
local max_probes = tonumber(ARGV[7])
local lease_ms = tonumber(ARGV[8])
local jitter = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local permit_epoch = tonumber(ARGV[11])
local lease = ARGV[12]
local probe = ARGV[13] == '1'

local h = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local state = h['state'] or 'closed'
local failures = tonumber(h['failures'] or '0')
local opened_until = tonumber(h['opened_until'] or '0')
local open_count = tonumber(h['open_count'] or '0')
local epoch = tonumber(h['epoch'] or '0')

local function live_leases(prune)
  local live, earliest = 0, nil
  for f, v in pairs(h) do
    if string.sub(f, 1, 6) == 'lease:' then
      local expiry = tonumber(v)
      if expiry > now then
        live = live + 1
        if earliest == nil or expiry < earliest then earliest = expiry end
      elseif prune then
        redis.call('HDEL', key, f)
      end
    end
  end
  return live, earliest
end

local function clear_leases()
  for f, _ in pairs(h) do
    if string.sub(f, 1, 6) == 'lease:' then redis.call('HDEL', key, f) end
  end
end

local function open(from)
  open_count = open_count + 1
  local duration = recovery * multiplier ^ math.min(open_count - 1, 64)
  if open_count > 1 then duration = duration * jitter end
  if duration > max_recovery then duration = max_recovery end
  clear_leases()
  epoch = epoch + 1
  redis.call('HSET', key, 'state', 'open', 'failures', failures,
    'opened_until', now + math.floor(duration), 'open_count', open_count, 'epoch', epoch)
  redis.call('PEXPIRE', key, ttl)
  return {from, 'open'}
end

if op == 'acquire' then
  local from, to = '', ''
  if state == 'open' then
    if now < opened_until then
      return {0, 0, epoch, opened_until - now, '', ''}
    end
    state = 'half_open'
    epoch = epoch + 1
    redis.call('HSET', key, 'state', state, 'epoch', epoch)
    redis.call('PEXPIRE', key, ttl)
    from, to = 'open', 'half_open'
  end
  if state == 'half_open' then
    local live, earliest = live_leases(true)
    if live < max_probes then
      redis.call('HSET', key, 'lease:' .. lease, now + lease_ms)
      return {1, 1, epoch, 0, from, to}
    end
    return {0, 0, epoch, earliest - now, from, to}
  end
  return {1, 0, epoch, 0, '', ''}
end

if op == 'success' then
  if permit_epoch ~= epoch then return {} end
  if state == 'closed' then
    if failures > 0 then redis.call('HSET', key, 'failures', 0) end
  elseif state == 'half_open' and probe then
    clear_leases()
    redis.call('HSET', key, 'state', 'closed', 'failures', 0, 'open_count', 0,
      'epoch', epoch + 1)
    redis.call('HDEL', key, 'opened_until')
    redis.call('PEXPIRE', key, ttl)
    return {'half_open', 'closed'}
  end
  return {}
end

if op == 'failure' then
  if permit_epoch ~= epoch then return {} end
  if state == 'closed' then
    failures = failures + 1
    if failures >= threshold then return open('closed') end
    redis.call('HSET', key, 'failures', failures)
    redis.call('PEXPIRE', key, ttl)
  elseif state == 'half_open' and probe then
    failures = failures + 1
    return open('half_open')
  end
  return {}
end

if op == 'release' then
  if state == 'half_open' and probe and permit_epoch == epoch then
    redis.call('HDEL', key, 'lease:' .. lease)
  end
  return {}
end

if op == 'snapshot' then
  local live = live_leases(false)
  local remaining = -1
  if state == 'open' then remaining = math.max(0, opened_until - now) end
  return {state, failures, remaining, open_count, live, epoch}
end

return redis.error_reply('unknown breaker operation ' .. op)
"""

# A quiet breaker's hash expires after a day (or longer than any open time).
_MIN_TTL_MS = 24 * 3600 * 1000


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _transition(reply: list[object], at: int = 0) -> Transition | None:
    if len(reply) < at + 2 or not _text(reply[at]):
        return None
    return Transition(BreakerState(_text(reply[at])), BreakerState(_text(reply[at + 1])))


async def preload_breaker_script(redis: Redis) -> None:
    """Loads the breaker script into Redis, so the first call needs no second trip."""
    await redis.script_load(_BREAKER_LUA)


class RedisBreakerStore:
    """Breaker state shared through Redis; each operation is one Lua script call.

    `clock`: only for tests, the script's "now" comes from `clock.time()` instead
    of Redis `TIME`. Errors from Redis propagate: wrap this store in a
    `FailoverBreakerStore` so they never reach a request.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str = "story:breaker:",
        clock: Clock | None = None,
    ) -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self._clock = clock
        self._script = redis.register_script(_BREAKER_LUA)

    def key(self, name: str) -> str:
        return f"{self._key_prefix}{name}"

    async def _eval(
        self,
        op: str,
        name: str,
        config: BreakerConfig,
        *,
        permit: Permit | None = None,
        lease_id: str = "",
        jitter: float = 1.0,
    ) -> list[object]:
        now = "" if self._clock is None else str(round(self._clock.time() * 1000))
        ttl_ms = max(_MIN_TTL_MS, int(2000 * (config.max_recovery_timeout + 1)))
        args: list[str | int | float] = [
            op,
            now,
            config.failure_threshold,
            config.recovery_timeout * 1000,
            config.max_recovery_timeout * 1000,
            config.backoff_multiplier,
            config.half_open_max_calls,
            config.probe_lease_seconds * 1000,
            jitter,
            ttl_ms,
            permit.epoch if permit else 0,
            (permit.lease_id or "") if permit else lease_id,
            1 if permit and permit.probe else 0,
        ]
        reply = await self._script(keys=[self.key(name)], args=args)
        return list(reply)

    async def acquire(self, name: str, config: BreakerConfig) -> Admission:
        lease_id = _new_lease_id()
        reply = await self._eval("acquire", name, config, lease_id=lease_id)
        admitted, probe, epoch, wait_ms = (int(_text(value)) for value in reply[:4])
        transition = _transition(reply, 4)
        if not admitted:
            return Admission(None, wait_ms / 1000, transition)
        permit = Permit(name, probe=bool(probe), epoch=epoch, lease_id=lease_id if probe else None)
        return Admission(permit, transition=transition)

    async def on_success(self, permit: Permit, config: BreakerConfig) -> Transition | None:
        return _transition(await self._eval("success", permit.name, config, permit=permit))

    async def on_failure(
        self, permit: Permit, config: BreakerConfig, *, jitter: float = 1.0
    ) -> Transition | None:
        reply = await self._eval("failure", permit.name, config, permit=permit, jitter=jitter)
        return _transition(reply)

    async def release(self, permit: Permit, config: BreakerConfig) -> None:
        if permit.probe:
            await self._eval("release", permit.name, config, permit=permit)

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot:
        reply = await self._eval("snapshot", name, config)
        state = BreakerState(_text(reply[0]))
        failures, remaining_ms, open_count, probes = (int(_text(v)) for v in reply[1:5])
        return BreakerSnapshot(
            name=name,
            state=state,
            consecutive_failures=failures,
            opened_until_seconds_from_now=remaining_ms / 1000 if remaining_ms >= 0 else None,
            open_count=open_count,
            probes_in_flight=probes,
        )


# --- Redis with an in-process fallback --------------------------------------------

_FALLBACK_ORIGIN = "fallback"


class RedisGate:
    """This process's shared view of whether Redis answers.

    Every part that uses Redis (breaker store, rate limiter, story cache) runs
    each call under the Redis budget and has an in-process fallback. Alone, each
    would find out about a silent Redis by spending its own budget, one after
    another in the same request. With the gate, the first part to see Redis fail
    closes it for `cool_down_seconds`, and the others go straight to their
    fallbacks: a request pays one budget, not one per part. Each part still
    decides on its own when to try Redis again (never before the gate reopens).
    """

    def __init__(self, cool_down_seconds: float = 1.0, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.cool_down_seconds = cool_down_seconds
        self._clock = clock
        self._closed_until = 0.0

    def is_open(self) -> bool:
        return self._clock.monotonic() >= self._closed_until

    def report_failure(self) -> None:
        self._closed_until = max(
            self._closed_until, self._clock.monotonic() + self.cool_down_seconds
        )


class FailoverBreakerStore:
    """`primary` (Redis) within `budget_seconds`, else `fallback` (in-process).

    While degraded, operations go straight to the fallback until
    `retry_interval_seconds` have passed; then the next operation tries the primary
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
        self.fallback = fallback or InMemoryBreakerStore(clock=clock)
        self.gate = gate
        self.budget_seconds = budget_seconds
        self.retry_interval_seconds = retry_interval_seconds
        self.observer = observer
        self._clock = clock
        self._degraded = False
        self._retry_at = 0.0
        self.last_error: BaseException | None = None

    @property
    def degraded(self) -> bool:
        """True while state is kept in-process because the primary failed."""
        return self._degraded

    async def _run(
        self,
        on_primary: Callable[[], Awaitable[T]],
        on_fallback: Callable[[], Awaitable[T]],
    ) -> tuple[T, bool]:
        """The operation's result, and whether the fallback produced it."""
        if self._degraded and self._clock.monotonic() < self._retry_at:
            return await on_fallback(), True
        if self.gate is not None and not self.gate.is_open():
            # Another part of this process just saw Redis fail: don't pay the budget too.
            return await on_fallback(), True
        try:
            async with asyncio.timeout(self.budget_seconds):
                result = await on_primary()
        except Exception as error:  # any store failure or timeout: never fail the call
            if self.gate is not None:
                self.gate.report_failure()
            self._degraded = True
            self.last_error = error
            self._retry_at = self._clock.monotonic() + self.retry_interval_seconds
            notify_observer(self.observer.store_fallback, error)
            return await on_fallback(), True
        if self._degraded:
            self._degraded = False
            notify_observer(self.observer.store_recovered)
        return result, False

    async def acquire(self, name: str, config: BreakerConfig) -> Admission:
        admission, from_fallback = await self._run(
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
            lambda: self.primary.on_failure(permit, config, jitter=jitter),
            lambda: self.fallback.on_failure(permit, config, jitter=jitter),
        )
        return transition

    async def release(self, permit: Permit, config: BreakerConfig) -> None:
        if permit.origin == _FALLBACK_ORIGIN:
            await self.fallback.release(permit, config)
            return
        await self._run(
            lambda: self.primary.release(permit, config),
            lambda: self.fallback.release(permit, config),
        )

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot:
        snapshot, from_fallback = await self._run(
            lambda: self.primary.snapshot(name, config),
            lambda: self.fallback.snapshot(name, config),
        )
        return dataclasses.replace(snapshot, store_degraded=from_fallback)
