"""The request's context: its id (echoed in `X-Request-ID`), its access-log line and timing."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.platform.logs import request_id_from, reset_request_id, set_request_id
from app.problems import problem_response

access_logger = logging.getLogger("app.access")

# Probes hit these every few seconds: log them at debug level only.
QUIET_PATHS = frozenset({"/health/live", "/health/ready", "/health", "/metrics"})


class RequestContextMiddleware:
    """Assigns the request id, echoes it in `X-Request-ID`, logs one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = request_id_from(incoming)
        token = set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_code = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status_code = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Rendered here, inside the request context, so even a 500 carries
            # the request id (Starlette's outermost handler runs after reset).
            access_logger.exception("unhandled error", extra={"path": scope.get("path")})
            if response_started:
                raise
            response = problem_response(
                500,
                "Internal server error",
                "Something went wrong on our side. Quote the request id when reporting it.",
                slug="internal",
                instance=scope.get("path"),
            )
            await response(scope, receive, send_with_id)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            path = scope.get("path", "")
            route = scope.get("route")
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            access_logger.log(
                level,
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": path,
                    "route": getattr(route, "path", None),
                    "status": status_code,
                    "latency_ms": round(elapsed_ms, 2),
                    "provider": scope.get("state", {}).get("provider"),
                    # Hash of the rate-limit client key (app.core.ratelimit), never the address.
                    "client": scope.get("state", {}).get("client_key_hash"),
                },
            )
            reset_request_id(token)
