"""Breaker state in Redis, shared by every worker and replica.

Each operation is ONE round trip: a Lua script (one hash per breaker) that reads
the state, decides with Redis server `TIME` (so replicas with skewed clocks agree)
and writes the outcome. Probe leases are `lease:<id> -> expiry_ms` fields of the
same hash. A store built with a `clock` passes `clock.time()` to the script as
"now" instead of `TIME`; that is for tests with a `FakeClock` only. Needs Redis
>= 5 (script effects replication, so `TIME` may precede writes). After a Redis
restart the first call costs two extra round trips (`NOSCRIPT` -> `SCRIPT LOAD`),
which `preload_breaker_script` at start-up avoids. Errors propagate: the app wraps
this store in `FailoverBreakerStore`, with a client from
`app.platform.redis.open_redis` that fails in milliseconds.
"""

from __future__ import annotations

from redis.asyncio import Redis

from app.core.resilience.breaker import (
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    Permit,
    Transition,
    new_lease_id,
)
from app.core.resilience.observer import BreakerState
from app.platform.clock import Clock

__all__ = ["RedisBreakerStore", "preload_breaker_script"]

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
  return {1, 0, epoch, 0, '', '', failures}
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
        lease_id = new_lease_id()
        reply = await self._eval("acquire", name, config, lease_id=lease_id)
        admitted, probe, epoch, wait_ms = (int(_text(value)) for value in reply[:4])
        transition = _transition(reply, 4)
        if not admitted:
            return Admission(None, wait_ms / 1000, transition)
        # Closed with no failure counted (the 7th value): its success has nothing to reset.
        clean = not probe and len(reply) > 6 and int(_text(reply[6])) == 0
        permit = Permit(
            name,
            probe=bool(probe),
            epoch=epoch,
            lease_id=lease_id if probe else None,
            clean=clean,
        )
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
