"""Request-header limits: too many headers, or too many header bytes, get 431.

The server bounds the request head first (`python -m app`: `MAX_REQUEST_HEAD_BYTES`,
answered with a plain 400 by uvicorn's h11 parser, which the app never sees); this
check refuses, with a problem+json 431 the app can explain, what got through but is
still more than a client of this API sends (`MAX_HEADER_COUNT`, `MAX_HEADER_BYTES`).
It runs before rate limiting, maintenance and the routers, and reads nothing but
the header list the server already parsed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.problems import problem_response

STATUS = 431
TITLE = "Request header fields too large"
SLUG = "header-fields-too-large"


class HeaderLimitMiddleware:
    """Pure ASGI: refuses requests with more than `max_count` headers or `max_bytes` of them."""

    def __init__(self, app: ASGIApp, *, max_count: int, max_bytes: int) -> None:
        self.app = app
        self.max_count = max_count
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if len(headers) > self.max_count:
            detail = f"The request has {len(headers)} headers; at most {self.max_count} are read."
        elif (size := sum(len(name) + len(value) for name, value in headers)) > self.max_bytes:
            detail = f"The request headers hold {size} bytes; at most {self.max_bytes} are read."
        else:
            await self.app(scope, receive, send)
            return
        response = problem_response(
            STATUS,
            TITLE,
            detail,
            slug=SLUG,
            instance=scope.get("path"),
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
