"""Health endpoints for probes and operators, in the IETF health-check format.

- `GET /health/live`: the process and its event loop answer. It reads nothing,
  so a Redis, database or upstream outage can never get a healthy pod restarted.
- `GET /health/ready`: can this instance serve? 503 names what fails.
- `GET /health`: everything an operator wants on one page.

Both of the latter are `application/health+json` (draft-inadarei-api-health-check),
built by `app.services.health.HealthService`; nothing here ever calls an
upstream provider.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.dependencies import HealthDep
from app.services.health import HealthReport

router = APIRouter(tags=["health"])

HEALTH_JSON = "application/health+json"
_LIVE = b'{"status":"pass"}'


def _render(report: HealthReport) -> Response:
    status_code = 503 if report.failing else 200
    return JSONResponse(report.body, status_code=status_code, media_type=HEALTH_JSON)


@router.get("/health/live", response_class=Response)
async def live() -> Response:
    return Response(_LIVE, media_type=HEALTH_JSON)


@router.get("/health/ready", response_class=JSONResponse)
async def ready(health: HealthDep) -> Response:
    return _render(await health.readiness())


@router.get("/health", response_class=JSONResponse)
async def health(health: HealthDep) -> Response:
    return _render(await health.report())
