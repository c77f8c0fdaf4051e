"""Request metrics: every HTTP request counted and timed by route template and status;
and the rendered exposition `/metrics` serves (`RenderedMetrics`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.platform.metrics import HTTP_IN_FLIGHT, HTTP_LATENCY, HTTP_REQUESTS, render_metrics

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


class RenderedMetrics:
    """The exposition, rendered at most once per `max_age_seconds`.

    A scrape flood (several Prometheus servers, a misconfigured scraper, a
    curl loop) then costs one render per interval, not one per request;
    scrapes during a render share it. `max_age_seconds=0`: every scrape renders.
    A page at most this old is what Prometheus expects of a target anyway: it
    reads values, not the instant they were read at.
    """

    def __init__(
        self,
        max_age_seconds: float,
        render: Callable[[], Awaitable[bytes]] = render_metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_seconds = max_age_seconds
        self._render = render
        self._clock = clock
        self._page: bytes | None = None
        self._rendered_at = 0.0
        self._rendering: asyncio.Future[bytes] | None = None

    async def page(self) -> bytes:
        if self._page is not None and self._clock() - self._rendered_at < self.max_age_seconds:
            return self._page
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render_once())
        # Shielded: a scrape that gives up does not cancel the render others await.
        return await asyncio.shield(self._rendering)

    async def _render_once(self) -> bytes:
        try:
            page = await self._render()
            self._page, self._rendered_at = page, self._clock()
            return page
        finally:
            self._rendering = None
