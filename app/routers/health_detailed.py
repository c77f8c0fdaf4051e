"""Health endpoints for probes and operators.

`/health/live` answers from the process alone: it never touches Redis, the
database or an upstream, so a dependency outage can never get pods restarted.
`/health/ready` says whether this instance can serve: migrations applied,
database reachable, Redis reachable when configured, not draining.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.lifespan import AppState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

HEALTH_JSON = "application/health+json"
_CHECK_TIMEOUT_SECONDS = 1.0


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "pass"}, media_type=HEALTH_JSON)


async def _timed(check: Any) -> tuple[str, float | None, str | None]:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
            millis = await check()
    except Exception as error:
        return "fail", None, repr(error)
    return "pass", millis, None


async def _redis_ping(state: AppState) -> float:
    assert state.redis is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    await state.redis.ping()
    return (loop.time() - started) * 1000


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    state: AppState = request.state.app_state
    checks: dict[str, Any] = {}
    database = _timed(state.repository.ping)
    redis = _timed(lambda: _redis_ping(state)) if state.redis is not None else None
    db_status, db_ms, db_error = await database
    checks["database"] = {"status": db_status, "backend": state.repository.backend}
    if db_ms is not None:
        checks["database"]["latency_ms"] = round(db_ms, 2)
    if db_error:
        checks["database"]["error"] = db_error
    if redis is not None:
        r_status, r_ms, r_error = await redis
        checks["redis"] = {"status": r_status}
        if r_ms is not None:
            checks["redis"]["latency_ms"] = round(r_ms, 2)
        if r_error:
            checks["redis"]["error"] = r_error
    else:
        checks["redis"] = {"status": "pass", "backend": "in-process"}
    if state.draining:
        checks["lifecycle"] = {"status": "fail", "detail": "draining: shutting down"}
    failed = [name for name, check in checks.items() if check["status"] == "fail"]
    body: dict[str, Any] = {"status": "fail" if failed else "pass", "checks": checks}
    if failed:
        body["failing"] = failed
    return JSONResponse(body, status_code=503 if failed else 200, media_type=HEALTH_JSON)
