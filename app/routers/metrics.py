"""`GET /metrics`: every metric in the Prometheus text format, for the scraper.

Breaker states are read from their store just before rendering, so every worker
reports the state they all share (see `app.platform.metrics.refresh_breaker_states`).
Not rate limited, and served during maintenance.

With `METRICS_TOKEN` set, a scrape must send `Authorization: Bearer <token>`
(compared in constant time); anything else is a 401 problem+json, before any
metric is read. Unset, anyone who can reach the port can read the metrics: then
only the network (a NetworkPolicy, a private listener) keeps them to the scraper.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.dependencies import get_app_state
from app.errors import UnauthorizedError
from app.platform.metrics import CONTENT_TYPE, refresh_breaker_states, render_metrics

router = APIRouter(tags=["operations"])

# Reading breaker states must not hold a scrape for long: a store that does not
# answer in this time keeps the last value.
_BREAKER_READ_SECONDS = 0.25
_CHALLENGE = 'Bearer realm="metrics"'


def _authorized(request: Request, token: str) -> bool:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    # As bytes (compare_digest refuses non-ASCII str); headers arrive latin-1 decoded.
    given = credentials.strip().encode("latin-1")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode("utf-8"))


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = get_app_state(request)
    token = state.settings.metrics_token
    expected = token.get_secret_value() if token is not None else ""
    if expected and not _authorized(request, expected):  # an empty token is no token
        raise UnauthorizedError(
            "Metrics need `Authorization: Bearer <METRICS_TOKEN>`.", challenge=_CHALLENGE
        )
    await refresh_breaker_states(state.breakers, _BREAKER_READ_SECONDS)
    return Response(await render_metrics(), media_type=CONTENT_TYPE)
