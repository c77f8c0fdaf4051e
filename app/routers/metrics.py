"""`GET /metrics`: every metric in the Prometheus text format, for the scraper.

A scrape reads memory only, never Redis: breaker states are read from their
(shared) store in the background every METRICS_BREAKER_REFRESH_SECONDS (see
`app.platform.metrics.refresh_breaker_states`), and the rendered page is reused
for METRICS_CACHE_SECONDS (`app.http.metrics.RenderedMetrics`), so a flood of
scrapes costs one render per interval. Not rate limited, and served during
maintenance.

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
from app.http.metrics import RenderedMetrics
from app.platform.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])

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
    return Response(await _rendered(request).page(), media_type=CONTENT_TYPE)


def _rendered(request: Request) -> RenderedMetrics:
    """This app's page cache (made at the first scrape, kept on `app.state`)."""
    rendered = getattr(request.app.state, "rendered_metrics", None)
    if not isinstance(rendered, RenderedMetrics):
        max_age = get_app_state(request).settings.metrics_cache_seconds
        rendered = request.app.state.rendered_metrics = RenderedMetrics(max_age)
    return rendered
