"""Request metrics: every HTTP request counted and timed by route template and status."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.platform.metrics import HTTP_IN_FLIGHT, HTTP_LATENCY, HTTP_REQUESTS

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"
# Answered by maintenance mode before any route was chosen: planned, not an API error.
MAINTENANCE_ROUTE = "<maintenance>"
# A request-state entry naming the route label when no route template applies.
_ROUTE_LABEL = "metrics_route_label"


def label_unrouted(scope: Scope, label: str) -> None:
    """Count this request under `label` (e.g. `MAINTENANCE_ROUTE`) instead of `<unmatched>`.

    For middleware that answers before the router runs; a matched route still wins.
    """
    scope.setdefault("state", {})[_ROUTE_LABEL] = label


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    label = scope.get("state", {}).get(_ROUTE_LABEL)
    return label if isinstance(label, str) else UNMATCHED_ROUTE


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by route template and status.

    The route template (`/v1/stories/{story_id}`), never the raw path, so the
    number of series stays bounded whatever callers send. A request no route
    answered is `<unmatched>`, or `<maintenance>` when maintenance mode answered
    it (so planned 503s stay out of the error-rate alerts).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        status = 500
        started = time.perf_counter()

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            HTTP_IN_FLIGHT.dec()
            route = _route_of(scope)
            code = str(status)
            HTTP_REQUESTS.labels(method, route, code).inc()
            HTTP_LATENCY.labels(method, route, code).observe(time.perf_counter() - started)
