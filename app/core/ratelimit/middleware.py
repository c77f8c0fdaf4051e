"""The rate limiter's middleware: names the client once per request, adds the headers."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.ratelimit.clients import PrincipalOf, TrustedProxies, client_key, key_hash
from app.core.ratelimit.policy import CLIENT_KEY, RATE_LIMIT_HEADERS, is_operational_path


class RateLimitMiddleware:
    """Pure ASGI, outside the router: names the client, and adds the rate-limit headers.

    It works out the client key once per request (kept in the request state for
    the route's check, `app.dependencies.enforce_rate_limit`, and hashed for
    the access log), marks the request as checked for slowapi's decorator (whose
    synchronous check must never run), and copies the headers the check left onto
    the response, whatever its kind.
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
        state[CLIENT_KEY] = key
        state["client_key_hash"] = key_hash(key)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and RATE_LIMIT_HEADERS in state:
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [
                    (name.lower().encode(), value.encode())
                    for name, value in state[RATE_LIMIT_HEADERS].items()
                    if name.lower().encode() not in present
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
