"""The principal (who is asking) and how a request is mapped to one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import Request

from app.core.resilience import CircuitBreaker

#: Where the principal verified for this request is kept: in the request's own scope
#: (not `scope["state"]`, which a server or test harness may share between requests),
#: with the credentials it was verified from.
PRINCIPAL_SCOPE_KEY = "story.principal"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: `id` owns the stories it creates, and keys its rate limits
    when `authenticated` (an anonymous caller is keyed by its address)."""

    id: str
    authenticated: bool


class Authenticator(Protocol):
    """Maps a request to its principal.

    `authenticate` is the full check (it may fetch keys: I/O) and raises
    `UnauthorizedError` (401) or `ServiceUnavailableError` (503, keys cannot be
    fetched). `authenticate_cached` never does I/O and never raises: the principal
    when the request can be verified with what is already held, else None. The
    rate limiter's middleware (synchronous) keys limits with it.
    """

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        """Breakers of its own upstream (the JWKS), for /health and /metrics."""
        ...

    async def authenticate(self, request: Request) -> Principal: ...

    def authenticate_cached(self, request: Request) -> Principal | None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class AnonymousAuthenticator:
    """Every request is the same anonymous principal (`AUTH_MODE=none`)."""

    def __init__(self, principal_id: str = "anonymous") -> None:
        self.principal = Principal(principal_id, authenticated=False)
        self.breakers: Mapping[str, CircuitBreaker] = {}

    async def authenticate(self, request: Request) -> Principal:
        return self.principal

    def authenticate_cached(self, request: Request) -> Principal | None:
        return self.principal

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _credentials(request: Request) -> tuple[str, ...]:
    return tuple(request.headers.getlist("authorization"))


def remembered_principal(request: Request) -> Principal | None:
    """The principal already verified for this request and these credentials, if any."""
    found = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if not isinstance(found, tuple) or found[0] != _credentials(request):
        return None
    principal = found[1]
    return principal if isinstance(principal, Principal) else None


def remember_principal(request: Request, principal: Principal) -> None:
    """Keeps a verified principal for the rest of this request (one check per request)."""
    request.scope[PRINCIPAL_SCOPE_KEY] = (_credentials(request), principal)
