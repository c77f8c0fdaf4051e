"""RFC 6750 bearer tokens: reading `Authorization`, and the `WWW-Authenticate` challenge.

A request without bearer credentials (no header, or another scheme) gets the
bare challenge, `Bearer realm="stories"`; a token that is refused gets
`error="invalid_token"` and a short, fixed `error_description` (never anything
taken from the token).
"""

from __future__ import annotations

import re

from starlette.requests import Request

from app.errors import UnauthorizedError

REALM = "stories"
#: Longer than any token our identity provider issues; longer ones are not parsed.
MAX_TOKEN_CHARS = 8192
# RFC 6750 b64token.
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")

MISSING_DETAIL = "Send a bearer token: Authorization: Bearer <token>."


class InvalidTokenError(Exception):
    """A token (or Authorization header) that is refused: a fixed `reason`, and the
    token's `kid` (the only part of a token that is ever logged)."""

    def __init__(self, reason: str, kid: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kid = kid


def challenge(reason: str | None = None) -> str:
    """The `WWW-Authenticate` value; with a reason, an `invalid_token` error."""
    if reason is None:
        return f'Bearer realm="{REALM}"'
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{reason}"'


def missing_token() -> UnauthorizedError:
    return UnauthorizedError(MISSING_DETAIL, challenge=challenge())


def refused(reason: str) -> UnauthorizedError:
    return UnauthorizedError(
        f"The bearer token was refused: {reason}.", challenge=challenge(reason)
    )


def bearer_token(request: Request) -> str | None:
    """The bearer token, None without bearer credentials; `InvalidTokenError` when
    the header says Bearer but is malformed (or there are several)."""
    values = request.headers.getlist("authorization")
    if not values:
        return None
    if len(values) > 1:
        raise InvalidTokenError("malformed authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme: no bearer credentials (RFC 6750, section 3.1)
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_CHARS or not _B64TOKEN.match(token):
        raise InvalidTokenError("malformed authorization header")
    return token
