"""Which limits apply to a request, and the check itself.

Built on slowapi's `Limiter` (its `@limiter.limit("5/minute")` decorator
and `@limiter.exempt`) and `limits`' rate items and in-memory storage, but not
slowapi's request path: slowapi 0.1.10 checks limits with *synchronous* storage
calls inside the request, and with Redis each check would block the event loop
for a network round trip (seconds, with redis-py's defaults, when Redis is
silent); its middleware also cannot find routes behind FastAPI 0.165's included
routers. Here the check runs in the route itself, before the body is read
(`app.dependencies.RateLimitedRoute`, the route class of the API's routers,
calling `enforce_rate_limit`), and it is asynchronous:
counting is `app.core.ratelimit.counters`' (one Redis round trip within a
budget, shared by every worker and replica; in this process while Redis fails).

Limits apply per client across the API (`RATE_LIMIT_PER_CLIENT`: every route
counted together), and per client and route beneath it (method and path
template): a route's own limit from settings (`RATE_LIMIT_CREATE_STORY`,
`RATE_LIMIT_ROUTES`), else a `@limiter.limit` decorator on its endpoint, else
`RATE_LIMIT_DEFAULT`. Both are counted in one call to the counters. Health
probes and `/metrics` are never limited. Every limited response carries
`X-RateLimit-Limit`, `-Remaining` and `-Reset` (Unix time, seconds); a refused
one is `429 application/problem+json` with `Retry-After` too. `RateLimitMiddleware`
(pure ASGI) names the client once per request and puts the headers on responses
of every kind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItem, parse_many
from slowapi import Limiter
from starlette.requests import Request

from app.core.ratelimit.counters import Counters
from app.errors import AppError
from app.platform.config import RateLimitSettings
from app.platform.metrics import record_rate_limited


def is_operational_path(path: str) -> bool:
    """Health probes and the metrics endpoint: never limited, never in maintenance."""
    return path == "/metrics" or path == "/health" or path.startswith("/health/")


def _unused_key_func(request: Request) -> str:
    """slowapi requires one; keys come from `client_key` (see `RateLimitMiddleware`)."""
    raise NotImplementedError


class RateLimiter(Limiter):
    """slowapi's `Limiter`, used for its decorators only (`limit`, `exempt`).

    The limits its decorators register are read by `RateLimitPolicy` (the
    `enforce_rate_limit` check), which enforces them asynchronously; slowapi's
    own synchronous check never runs (`RateLimitMiddleware` marks every request as
    checked before the endpoint is called). A decorated endpoint must take a
    `request: Request` parameter, as slowapi requires, and belong to a router
    whose `route_class` is `RateLimitedRoute`. The decorator's `key_func`, `cost`
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


class RateLimitedError(AppError):
    status_code = 429
    title = "Too many requests"
    slug = "rate-limited"


class RateLimitPolicy:
    """Which limits apply to a request, and the check itself (`enforce_rate_limit`)."""

    def __init__(
        self,
        settings: RateLimitSettings,
        counters: Counters,
        *,
        rate_limiter: RateLimiter = limiter,
    ) -> None:
        self.enabled = settings.enabled
        self.counters = counters
        self.limiter = rate_limiter
        self.default = parse_many(settings.default)
        self.per_client = parse_many(settings.per_client)
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
        route = self.limits_for(request, template)
        if not route:
            return  # exempt (or no limit at all): not counted against the client either
        # The route's own limits and the client's limit across the API, in one call.
        items = [*route, *self.per_client]
        scopes = [f"{request.method} {template}"] * len(route) + [ACROSS_THE_API] * len(
            self.per_client
        )
        results = await self.counters.hit(items, key, scopes)
        refused_at = next((i for i, r in enumerate(results) if not r.allowed), None)
        refused = None if refused_at is None else results[refused_at]
        shown = refused or min(results, key=lambda r: r.remaining)
        headers = {
            "X-RateLimit-Limit": str(shown.item.amount),
            "X-RateLimit-Remaining": str(shown.remaining),
            "X-RateLimit-Reset": str(math.ceil(shown.reset_at)),
        }
        if refused is None:
            request.scope.setdefault("state", {})[RATE_LIMIT_HEADERS] = headers
            return
        record_rate_limited(template)
        retry_after = refused.retry_after(time.time())
        where = (
            "to this endpoint"
            if refused_at is not None and refused_at < len(route)
            else ("across the API")
        )
        raise RateLimitedError(
            f"This client may make {refused.item.amount} requests per "
            f"{_window_text(refused.item)} {where}. Retry in {retry_after} s.",
            headers={**headers, "Retry-After": str(retry_after)},
        )


def _window_text(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"


#: The scope of the client's limit across the API (`RATE_LIMIT_PER_CLIENT`).
ACROSS_THE_API = "*"

#: Request-state entries: the client key `RateLimitMiddleware` worked out, and the
#: headers the check leaves for the middleware to put on the response.
CLIENT_KEY = "client_key"
RATE_LIMIT_HEADERS = "rate_limit_headers"
