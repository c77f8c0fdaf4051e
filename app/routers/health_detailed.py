"""Health endpoints for probes and operators, in the IETF health-check format.

- `GET /health/live`: the process and its event loop answer. It reads nothing,
  so a Redis, database or upstream outage can never get a healthy pod restarted.
- `GET /health/ready`: can this instance serve? 503 names what fails.
- `GET /health`: everything an operator wants on one page.

All three are `application/health+json` (draft-inadarei-api-health-check), the
latter two built by `app.services.health.HealthService`; nothing here ever calls
an upstream provider. The document's schema is `app.http.openapi.HealthDocument`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.dependencies import HealthDep
from app.http.openapi import HEALTH_JSON, HealthDocument
from app.services.health import HealthReport

router = APIRouter(tags=["health"])

_LIVE = b'{"status":"pass"}'
_READY_EXAMPLE = {
    "status": "pass",
    "checks": {
        "database:responseTime": [
            {
                "componentType": "datastore",
                "componentId": "postgresql",
                "observedValue": 1.2,
                "observedUnit": "ms",
                "status": "pass",
                "time": "2026-12-01T12:00:00.000+00:00",
            }
        ]
    },
}
_FAILING_EXAMPLE = {
    "status": "fail",
    "checks": {
        "database:responseTime": [
            {
                "componentType": "datastore",
                "componentId": "postgresql",
                "status": "fail",
                "time": "2026-12-01T12:00:00.000+00:00",
                "output": "no answer within 1 s",
            }
        ]
    },
    "failing": ["database"],
}


class HealthJSONResponse(JSONResponse):
    media_type = HEALTH_JSON


def _documented(ok: dict[str, Any], failing: dict[str, Any] | None) -> dict[int | str, Any]:
    content = {HEALTH_JSON: {"schema": {"$ref": "#/components/schemas/HealthDocument"}}}
    responses: dict[int | str, Any] = {
        200: {"content": {HEALTH_JSON: {"example": ok}}},
    }
    if failing is not None:
        responses[503] = {
            "description": "Something readiness needs fails (`failing` names it).",
            "content": {**content, HEALTH_JSON: {**content[HEALTH_JSON], "example": failing}},
        }
    return responses


def _render(report: HealthReport) -> Response:
    status_code = 503 if report.failing else 200
    return HealthJSONResponse(report.body, status_code=status_code)


@router.get(
    "/health/live",
    response_model=HealthDocument,
    response_class=HealthJSONResponse,
    summary="Liveness: the process answers",
    responses=_documented({"status": "pass"}, None),
)
async def get_liveness() -> Response:
    return Response(_LIVE, media_type=HEALTH_JSON)


@router.get(
    "/health/ready",
    response_model=HealthDocument,
    response_class=HealthJSONResponse,
    summary="Readiness: this instance can serve",
    responses=_documented(_READY_EXAMPLE, _FAILING_EXAMPLE),
)
async def get_readiness(health: HealthDep) -> Response:
    return _render(await health.readiness())


@router.get(
    "/health",
    response_model=HealthDocument,
    response_class=HealthJSONResponse,
    summary="Everything an operator wants on one page",
    responses=_documented(
        {**_READY_EXAMPLE, "version": "0.1.0", "serviceId": "story-service"}, _FAILING_EXAMPLE
    ),
)
async def get_health(health: HealthDep) -> Response:
    return _render(await health.report())
