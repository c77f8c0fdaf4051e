"""`GET /metrics`: every metric in the Prometheus text format, for the scraper.

Breaker states are read from their store just before rendering, so every worker
reports the state they all share (see `app.platform.metrics.refresh_breaker_states`).
Not rate limited, and served during maintenance.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.dependencies import get_app_state
from app.platform.metrics import CONTENT_TYPE, refresh_breaker_states, render_metrics

router = APIRouter(tags=["operations"])

# Reading breaker states must not hold a scrape for long: a store that does not
# answer in this time keeps the last value.
_BREAKER_READ_SECONDS = 0.25


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    await refresh_breaker_states(get_app_state(request).breakers, _BREAKER_READ_SECONDS)
    return Response(await render_metrics(), media_type=CONTENT_TYPE)
