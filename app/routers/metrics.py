"""`GET /metrics`: every metric in the Prometheus text format, for the scraper.

Breaker states are read from their store just before rendering, so every worker
reports the state they all share (see `app.core.metrics.refresh_breaker_states`).
Not rate limited, and served during maintenance.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.core.metrics import CONTENT_TYPE, refresh_breaker_states, render_metrics

router = APIRouter(tags=["operations"])

# Reading breaker states must not hold a scrape for long: a store that does not
# answer in this time keeps the last value.
_BREAKER_READ_SECONDS = 0.25


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = getattr(request.state, "app_state", None)
    breakers = getattr(state, "breakers", None) or {}
    await refresh_breaker_states(breakers, _BREAKER_READ_SECONDS)
    return Response(await render_metrics(), media_type=CONTENT_TYPE)
