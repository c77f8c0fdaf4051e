"""Maintenance mode at the door: while the switch is on, API requests get 503."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.ratelimit import is_operational_path
from app.dependencies import app_state_of
from app.http.metrics import MAINTENANCE_ROUTE, label_unrouted
from app.problems import problem_response


class MaintenanceMiddleware:
    """Pure ASGI: while maintenance is on, every non-operational request gets 503.

    Those answers are counted under route `<maintenance>`, not `<unmatched>`: the
    error-rate alerts leave them out (a planned outage pages nobody).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        switch = app_state_of(scope["app"]).maintenance
        if not switch.on or is_operational_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        label_unrouted(scope, MAINTENANCE_ROUTE)
        response = problem_response(
            503,
            "Down for maintenance",
            "The service is in maintenance. Please retry later.",
            slug="maintenance",
            instance=scope.get("path"),
            headers={"Retry-After": str(switch.retry_after_seconds)},
        )
        await response(scope, receive, send)
