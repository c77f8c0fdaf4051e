"""Tiny getters of the lifespan's `AppState`, with `Annotated` aliases for routes.

The state is built by `app.lifespan` and held at `app.state.app_state`; this
module is the only place that reads it from there. A missing part is a wiring
error and fails loudly, never a silently skipped check. The dependencies are
`async def` although they await nothing: FastAPI runs a plain `def` dependency
in its thread pool, a hop that halved the throughput of `/health`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from starlette.applications import Starlette

from app.core.ratelimit import CLIENT_KEY
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


async def enforce_rate_limit(request: Request) -> None:
    """Counts the request against the client's limits; `RateLimitedError` (429) when over.

    The client key was worked out by `RateLimitMiddleware`, which must be installed.
    """
    policy = get_app_state(request).rate_limits
    await policy.check(request, request.scope["state"][CLIENT_KEY])


class RateLimitedRoute(APIRoute):
    """A route whose every request is counted against the client's limits first.

    `APIRouter(route_class=RateLimitedRoute)` limits every route of that router.
    Not a dependency: FastAPI reads and parses the body before it runs any
    dependency, so a limited client's malformed body was a 422 (and its large
    body was read and parsed) instead of a 429. Here the check runs once the
    router has chosen the route (limits are per route template and endpoint)
    and before the body is touched. A `RateLimitedError` raised here goes to the
    app's exception handlers like any other error of the endpoint.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def limited(request: Request) -> Response:
            await enforce_rate_limit(request)
            return await handle(request)

        return limited
