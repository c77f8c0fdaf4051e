"""Tiny getters of the lifespan's `AppState`, with `Annotated` aliases for routes.

The state is built by `app.lifespan` and held at `app.state.app_state`; this
module is the only place that reads it from there. A missing part is a wiring
error and fails loudly, never a silently skipped check. The dependencies are
`async def` although they await nothing: FastAPI runs a plain `def` dependency
in its thread pool, a hop that halved the throughput of `/health`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.applications import Starlette

from app.core.ratelimit import CLIENT_KEY, RateLimitPolicy
from app.core.security import remember_principal, remembered_principal
from app.lifespan import AppState
from app.services.health import HealthService
from app.services.stories import StoryService


def app_state_of(app: Starlette) -> AppState:
    state: AppState = app.state.app_state
    return state


def get_app_state(request: Request) -> AppState:
    return app_state_of(request.app)


def principal_of(request: Request) -> str:
    """Who is asking, without I/O, for the rate limiter's (synchronous) key: the
    principal when the token verifies with keys already held, else the anonymous
    principal (keyed by address). Never raises for a bad token: `get_principal` does."""
    principal = remembered_principal(request)
    if principal is None:
        state = get_app_state(request)
        principal = state.identity.authenticate_cached(request)
        if principal is None:
            return state.settings.anonymous_principal
        remember_principal(request, principal)
    return principal.id


async def get_story_service(request: Request) -> StoryService:
    return get_app_state(request).stories


async def get_health(request: Request) -> HealthService:
    return get_app_state(request).health


async def get_rate_limits(request: Request) -> RateLimitPolicy:
    return get_app_state(request).rate_limits


async def get_principal(request: Request) -> str:
    """The id that owns the stories the caller creates and reads; 401 without a
    valid token (in `AUTH_MODE=jwt`). A token verified once per request."""
    principal = remembered_principal(request)
    if principal is None:
        principal = await get_app_state(request).identity.authenticate(request)
        remember_principal(request, principal)
    return principal.id


StoryServiceDep = Annotated[StoryService, Depends(get_story_service)]
HealthDep = Annotated[HealthService, Depends(get_health)]
PrincipalDep = Annotated[str, Depends(get_principal)]
RateLimitsDep = Annotated[RateLimitPolicy, Depends(get_rate_limits)]


async def enforce_rate_limit(request: Request, policy: RateLimitsDep) -> None:
    """The route dependency that applies the limits (see `RATE_LIMITED`).

    A dependency, not middleware: it runs once the router has chosen the route, so
    limits are per route template and endpoint, whatever the router's internals.
    The client key was worked out by `RateLimitMiddleware`, which must be installed.
    """
    await policy.check(request, request.scope["state"][CLIENT_KEY])


#: `app.include_router(router, dependencies=RATE_LIMITED)` limits every route of `router`.
RATE_LIMITED = [Depends(enforce_rate_limit)]
