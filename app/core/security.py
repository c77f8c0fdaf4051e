"""Who is calling, and how often they may: client identity and rate limiting.

Client identity. The client key is the authenticated principal when there is
one, else the client IP. The client IP is the direct peer's address, unless that
peer is a configured trusted proxy (`TRUSTED_PROXIES`): then `X-Forwarded-For`
(or, without it, `Forwarded`) is read from the right, skipping trusted hops, and
the first untrusted address is the client. A header sent by anyone else is
ignored, so a spoofed `X-Forwarded-For` never buys a fresh quota. An
IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket reports
for an IPv4 peer) is read as its IPv4 address, for trust checks and keys alike.
An IPv4 client is keyed by its address, an IPv6 client by its /64
(`IPV6_CLIENT_PREFIX`): one subscriber usually holds a whole /64, and cycling
through its addresses must not buy fresh quotas. Logs carry `key_hash(key)`, a
hash keyed with a random secret drawn when the process starts: it correlates the
requests of one client within one process, and cannot be reversed by hashing
candidate addresses (nor correlated across processes or restarts).

Rate limiting. slowapi's `Limiter` (its `@limiter.limit("5/minute")` decorator
and `@limiter.exempt`) and `limits`' rate items and in-memory storage, but not
slowapi's request path: slowapi 0.1.10 checks limits with *synchronous* storage
calls inside the request, and with Redis each check would block the event loop
for a network round trip (seconds, with redis-py's defaults, when Redis is
silent); its middleware also cannot find routes behind FastAPI 0.165's included
routers. Here the check is a route dependency, `enforce_rate_limit` (applied with
`app.include_router(router, dependencies=RATE_LIMITED)`), and it is asynchronous:

- with `REDIS_URL`: one fixed window per client, route and limit, in Redis, ONE
  round trip per request (a Lua script: INCRBY, set the window's expiry, return
  count and time left; the same algorithm as `limits`' fixed window, which needs
  three round trips to also return the header figures), under a hard budget
  (`RATE_LIMIT_REDIS_BUDGET_MS`). Every worker and replica shares the counts.
  The keys of one call share a hash tag (`{client|route}`), so the script also
  runs on Redis Cluster (all its keys in one slot, no CROSSSLOT).
- without Redis, or while Redis fails: `limits.aio`'s `MemoryStorage` with its
  fixed-window strategy, in this process. When Redis errors or misses the
  budget, this process counts in memory for `RATE_LIMIT_REDIS_RETRY_SECONDS`,
  then one request tries Redis again: a dead or silent Redis costs at most one
  budget per process per retry period, never a 500, never a hang. While the
  process's `RedisGate` is closed (another part just saw Redis fail) it counts
  in memory too, and says so (`degraded`), until a hit through the reopened gate
  reaches Redis.

Limits apply per client and per route (method and path template): a route's own
limit from settings (`RATE_LIMIT_CREATE_STORY`, `RATE_LIMIT_ROUTES`), else a
`@limiter.limit` decorator on its endpoint, else `RATE_LIMIT_DEFAULT`. Health
probes and `/metrics` are never limited. Every limited response carries
`X-RateLimit-Limit`, `-Remaining` and `-Reset` (Unix time, seconds); a refused
one is `429 application/problem+json` with `Retry-After` too. `RateLimitMiddleware`
(pure ASGI) names the client once per request and puts the headers on responses
of every kind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, Protocol

from fastapi import Depends
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.asyncio import Redis
from slowapi import Limiter
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import RateLimitSettings
from app.core.metrics import record_rate_limit_storage, record_rate_limited
from app.core.state import RedisGate
from app.errors import AppError

__all__ = [
    "IPV6_CLIENT_PREFIX",
    "RATE_LIMITED",
    "FailoverCounters",
    "InProcessCounters",
    "RateLimitMiddleware",
    "RateLimitPolicy",
    "RateLimitedError",
    "RateLimiter",
    "RedisCounters",
    "TrustedProxies",
    "WindowResult",
    "client_ip",
    "client_key",
    "enforce_rate_limit",
    "is_operational_path",
    "key_hash",
    "limiter",
]

logger = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
PrincipalOf = Callable[[Request], str]


def is_operational_path(path: str) -> bool:
    """Health probes and the metrics endpoint: never limited, never in maintenance."""
    return path == "/metrics" or path == "/health" or path.startswith("/health/")


# --- client identity -----------------------------------------------------------------


#: IPv6 clients are keyed by this many leading bits (an ISP's usual assignment: a /64).
IPV6_CLIENT_PREFIX = 64


def _unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` is the IPv4 peer a.b.c.d (as a dual-stack socket reports it)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The peers allowed to say who the client is (`TRUSTED_PROXIES`)."""

    def __init__(self, networks: Sequence[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, IPv4Address | IPv6Address):
            return False
        address = _unmapped(address)
        return any(address in network for network in self.networks)


def _parse_ip(value: str) -> IPAddress | None:
    """An address from a peer or a forwarding header: `1.2.3.4`, `1.2.3.4:80`,
    `[::1]:80`, `"[::1]"`; an IPv4-mapped IPv6 address comes back as IPv4."""
    value = value.strip().strip('"').strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:  # IPv4 with a port
        value = value.split(":", 1)[0]
    try:
        return _unmapped(ip_address(value))
    except ValueError:
        return None


def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers", []) if k == name]


def _forwarded_chain(scope: Scope) -> list[str]:
    """The hops the proxies recorded, client first: X-Forwarded-For, else Forwarded's for=."""
    xff = _header_values(scope, b"x-forwarded-for")
    if xff:
        return [hop.strip() for value in xff for hop in value.split(",") if hop.strip()]
    chain: list[str] = []
    for value in _header_values(scope, b"forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.strip().lower() == "for" and token:
                    chain.append(token)
    return chain


def _client_address(scope: Scope, trusted: TrustedProxies) -> IPAddress | str:
    """The caller's address; forwarding headers count only from a trusted peer.

    The peer's own text when it is not an address (a Unix socket, a test client).
    """
    client = scope.get("client")
    peer_text = str(client[0]) if client else ""
    peer = _parse_ip(peer_text)
    if peer is None:
        return peer_text or "unknown"
    if peer not in trusted:
        return peer
    chain = _forwarded_chain(scope)
    if not chain:
        return peer
    for hop in reversed(chain):
        address = _parse_ip(hop)
        if address is None:
            # A proxy we trust wrote something that is not an address
            # ("unknown", "_hidden"): the nearest address we can vouch for is its own.
            return peer
        if address not in trusted:
            return address
    # Every hop is one of our proxies: the leftmost is the closest to the client.
    return _parse_ip(chain[0]) or peer


def client_ip(scope: Scope, trusted: TrustedProxies) -> str:
    """The caller's address (IPv4-mapped ones as IPv4); see `client_key` for its key."""
    return str(_client_address(scope, trusted))


def client_key(
    scope: Scope,
    trusted: TrustedProxies,
    *,
    principal_of: PrincipalOf | None = None,
    anonymous: str = "anonymous",
    ipv6_prefix: int = IPV6_CLIENT_PREFIX,
) -> str:
    """`user:<principal>` for an authenticated caller, else `ip:<IPv4 address>` or
    `ip:<IPv6 network>/<ipv6_prefix>`."""
    if principal_of is not None:
        try:
            principal = principal_of(Request(scope))
        except Exception:  # no principal is not an error: key by address
            principal = anonymous
        if principal and principal != anonymous:
            return f"user:{principal}"
    address = _client_address(scope, trusted)
    if isinstance(address, IPv6Address):
        return f"ip:{IPv6Network((address, ipv6_prefix), strict=False)}"
    return f"ip:{address}"


# Drawn once per process: `key_hash` values correlate within this process only,
# and no one without it can test guessed addresses against a logged hash.
_KEY_HASH_SECRET = secrets.token_bytes(32)


def key_hash(key: str) -> str:
    """A short stand-in for a client key in logs: stable within this process only."""
    return hashlib.blake2b(key.encode(), digest_size=8, key=_KEY_HASH_SECRET).hexdigest()


# --- slowapi's decorator interface -------------------------------------------------------


def _unused_key_func(request: Request) -> str:
    """slowapi requires one; keys come from `client_key` (see `RateLimitMiddleware`)."""
    raise NotImplementedError


class RateLimiter(Limiter):
    """slowapi's `Limiter`, used for its decorators only (`limit`, `exempt`).

    The limits its decorators register are read by `RateLimitPolicy` (the
    `enforce_rate_limit` dependency), which enforces them asynchronously; slowapi's
    own synchronous check never runs (`RateLimitMiddleware` marks every request as
    checked before the endpoint is called). A decorated endpoint must take a
    `request: Request` parameter, as slowapi requires, and belong to a router
    included with `dependencies=RATE_LIMITED`. The decorator's `key_func`, `cost`
    and `exempt_when` are ignored: the key is always the client key.
    """

    def __init__(self) -> None:
        super().__init__(
            key_func=_unused_key_func,
            storage_uri="memory://",
            headers_enabled=False,
        )

    def limits_of(self, endpoint: Callable[..., Any], request: Request) -> list[RateLimitItem]:
        """The limits `@limiter.limit` put on `endpoint`; [] if none or exempt."""
        name = f"{endpoint.__module__}.{endpoint.__name__}"
        if name in self._exempt_routes:
            return []
        method = request.method.lower()
        found = list(self._route_limits.get(name, []))
        for group in self._dynamic_route_limits.get(name, []):
            # slowapi leaves this one unannotated.
            found.extend(group.with_request(request))  # type: ignore[no-untyped-call]
        return [lim.limit for lim in found if lim.methods is None or method in lim.methods]

    def is_exempt(self, endpoint: Callable[..., Any]) -> bool:
        return f"{endpoint.__module__}.{endpoint.__name__}" in self._exempt_routes


#: Decorate endpoints with `@limiter.limit("5/minute")` or `@limiter.exempt`.
limiter = RateLimiter()


# --- counting ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One limit after counting this request."""

    item: RateLimitItem
    allowed: bool
    remaining: int
    reset_at: float  # Unix time at which the window's count starts again

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.reset_at - now))


class Counters(Protocol):
    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: str
    ) -> list[WindowResult]: ...


class InProcessCounters:
    """`limits.aio` fixed windows in this process's memory."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.strategy = FixedWindowRateLimiter(self.storage)

    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: str
    ) -> list[WindowResult]:
        results: list[WindowResult] = []
        for item in items:
            allowed = await self.strategy.hit(item, client, scope)
            reset_at, remaining = await self.strategy.get_window_stats(item, client, scope)
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

    Keys read `story:ratelimit:{<client>|<route>}:<amount>/<multiples>/<unit>`: the
    part in braces is a Redis Cluster hash tag, so the keys of every limit of one
    route and client, which one script call touches together, live in one slot.
    """

    KEY_PREFIX = "story:ratelimit:"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(_FIXED_WINDOW_LUA)

    def key(self, item: RateLimitItem, client: str, scope: str) -> str:
        window = f"{item.amount}/{item.multiples}/{item.GRANULARITY.name}"
        return f"{self.KEY_PREFIX}{{{_tag_text(client)}|{_tag_text(scope)}}}:{window}"

    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: str
    ) -> list[WindowResult]:
        keys = [self.key(item, client, scope) for item in items]
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

    After a failure this process counts in memory for `retry_seconds`; then a single
    request tries Redis again (others keep counting in memory meanwhile). While the
    `gate` is closed (another part of this process saw Redis fail) it counts in
    memory as well, and reports itself degraded; that is not a failure of its own:
    the gate is not told again and no retry time is set, so the first hit after
    the gate reopens tries Redis.
    """

    def __init__(
        self,
        redis: RedisCounters | None,
        local: InProcessCounters,
        *,
        budget_seconds: float = 0.05,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        gate: RedisGate | None = None,
    ) -> None:
        self.redis = redis
        self.local = local
        self.gate = gate
        self.budget_seconds = budget_seconds
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._degraded = False
        self._retry_at = 0.0
        self._probing = False
        self.last_error: str | None = None

    @property
    def shared(self) -> bool:
        """True when counts are shared through Redis right now."""
        return self.redis is not None and not self._degraded

    @property
    def degraded(self) -> bool:
        """True when Redis is configured but this process is counting in memory."""
        return self._degraded

    async def hit(
        self, items: Sequence[RateLimitItem], client: str, scope: str
    ) -> list[WindowResult]:
        if self.redis is None:
            return await self.local.hit(items, client, scope)
        if self.gate is not None and not self.gate.is_open():
            # Another part of this process just saw Redis fail: count here for now.
            self._behind_closed_gate()
            return await self.local.hit(items, client, scope)
        probe = False
        if self._degraded:
            if self._probing or self._clock() < self._retry_at:
                return await self.local.hit(items, client, scope)
            self._probing = probe = True
        try:
            async with asyncio.timeout(self.budget_seconds):
                results = await self.redis.hit(items, client, scope)
        except Exception as error:  # Redis errors, timeouts, refusals: never the caller's
            self._fail(error)
            return await self.local.hit(items, client, scope)
        finally:
            if probe:
                self._probing = False
        if self._degraded:
            self._degraded = False
            self.last_error = None
            record_rate_limit_storage(degraded=False)
            logger.info("rate limit storage: Redis answers again; counts are shared")
        return results

    def _behind_closed_gate(self) -> None:
        if self._degraded:
            return
        self._degraded = True
        self.last_error = "Redis gate closed: another part of this process saw Redis fail"
        record_rate_limit_storage(degraded=True, redis_error=False)
        logger.warning(
            "rate limit storage: Redis gate closed; counting in this process",
            extra={"error": self.last_error},
        )

    def _fail(self, error: BaseException) -> None:
        if self.gate is not None:
            self.gate.report_failure()
        self._retry_at = self._clock() + self.retry_seconds
        self.last_error = repr(error) if str(error) else type(error).__name__
        if not self._degraded:
            self._degraded = True
            record_rate_limit_storage(degraded=True)
            logger.warning(
                "rate limit storage: Redis failed; counting in this process",
                extra={"error": self.last_error, "retry_seconds": self.retry_seconds},
            )


# --- enforcement: a route dependency, and the middleware around it ---------------------------


class RateLimitedError(AppError):
    status_code = 429
    title = "Too many requests"
    slug = "rate-limited"


class RateLimitPolicy:
    """Which limits apply to a request, and the check itself (`enforce_rate_limit`)."""

    def __init__(
        self,
        settings: RateLimitSettings,
        counters: Callable[[], Counters],
        *,
        rate_limiter: RateLimiter = limiter,
    ) -> None:
        self.enabled = settings.enabled
        self.counters = counters
        self.limiter = rate_limiter
        self.default = parse_many(settings.default)
        self.by_route = {route: parse_many(v) for route, v in settings.route_limits().items()}

    def limits_for(self, request: Request, template: str) -> list[RateLimitItem]:
        configured = self.by_route.get(f"{request.method} {template}")
        if configured is not None:
            return configured
        endpoint = request.scope.get("endpoint")
        if endpoint is not None:
            if self.limiter.is_exempt(endpoint):
                return []
            decorated = self.limiter.limits_of(endpoint, request)
            if decorated:
                return decorated
        return self.default

    async def check(self, request: Request, key: str) -> None:
        """Count this request; raise `RateLimitedError` (429) when over a limit."""
        template = getattr(request.scope.get("route"), "path", None)
        if not self.enabled or template is None or is_operational_path(request.url.path):
            return
        items = self.limits_for(request, template)
        if not items:
            return
        results = await self.counters().hit(items, key, f"{request.method} {template}")
        refused = next((r for r in results if not r.allowed), None)
        shown = refused or min(results, key=lambda r: r.remaining)
        headers = {
            "X-RateLimit-Limit": str(shown.item.amount),
            "X-RateLimit-Remaining": str(shown.remaining),
            "X-RateLimit-Reset": str(math.ceil(shown.reset_at)),
        }
        if refused is None:
            request.scope.setdefault("state", {})[_HEADERS] = headers
            return
        record_rate_limited(template)
        retry_after = refused.retry_after(time.time())
        raise RateLimitedError(
            f"This client may make {refused.item.amount} requests per "
            f"{_window_text(refused.item)} to this endpoint. Retry in {retry_after} s.",
            headers={**headers, "Retry-After": str(retry_after)},
        )


def _window_text(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"


_KEY = "client_key"
_HEADERS = "rate_limit_headers"


async def enforce_rate_limit(request: Request) -> None:
    """The route dependency that applies the limits (see `RATE_LIMITED`).

    A dependency, not middleware: it runs once the router has chosen the route, so
    limits are per route template and endpoint, whatever the router's internals.
    """
    operations = getattr(request.app.state, "operations", None)
    policy = getattr(operations, "rate_limits", None)
    if not isinstance(policy, RateLimitPolicy):
        return
    key = request.scope.get("state", {}).get(_KEY)
    if not isinstance(key, str):
        key = client_key(request.scope, TrustedProxies())
    await policy.check(request, key)


#: `app.include_router(router, dependencies=RATE_LIMITED)` limits every route of `router`.
RATE_LIMITED = [Depends(enforce_rate_limit)]


class RateLimitMiddleware:
    """Pure ASGI, outside the router: names the client, and adds the rate-limit headers.

    It works out the client key once per request (kept in the request state for
    `enforce_rate_limit`, and hashed for the access log), marks the request as
    checked for slowapi's decorator (whose synchronous check must never run), and
    copies the headers the check left onto the response, whatever its kind.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        trusted_proxies: TrustedProxies,
        principal_of: PrincipalOf | None = None,
        anonymous_principal: str = "anonymous",
    ) -> None:
        self.app = app
        self.trusted = trusted_proxies
        self.principal_of = principal_of
        self.anonymous = anonymous_principal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_operational_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["_rate_limiting_complete"] = True
        state["view_rate_limit"] = None
        key = client_key(
            scope, self.trusted, principal_of=self.principal_of, anonymous=self.anonymous
        )
        state[_KEY] = key
        state["client_key_hash"] = key_hash(key)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and _HEADERS in state:
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [
                    (name.lower().encode(), value.encode())
                    for name, value in state[_HEADERS].items()
                    if name.lower().encode() not in present
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
