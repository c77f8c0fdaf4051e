"""Health endpoints for probes and operators, in the IETF health-check format.

- `GET /health/live`: the process and its event loop answer. It reads nothing,
  so a Redis, database or upstream outage can never get a healthy pod restarted.
- `GET /health/ready`: can this instance serve? Migrations applied, database
  reachable, Redis reachable when configured (`HEALTH_REDIS_REQUIRED`), startup
  done, not draining after SIGTERM. 503 names what fails. An open circuit
  breaker, a missing provider key, in-process rate limiting or maintenance mode
  are warnings in the body, never a 503: taking every replica out of the load
  balancer because OpenAI is down would turn a degraded service into none.
- `GET /health`: everything an operator wants on one page, as
  `application/health+json` (draft-inadarei-api-health-check): Redis and
  database round trips, provider keys configured or not (never the keys), breaker
  states, CPU, memory and disk (from the background sampler), process RSS,
  uptime, version. Nothing here ever calls an upstream provider.

Dependency checks run concurrently, each bounded by `HEALTH_CHECK_TIMEOUT_SECONDS`;
one that does not answer in time is reported as failing and left to finish (or
fail) in the background, so the endpoint answers within its budget even when
Redis or the database hangs. Concurrent requests share one round of checks, and
its result is reused for `HEALTH_CACHE_SECONDS` (1 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.core.metrics import record_dependency_error
from app.core.operations import Operations
from app.core.resilience import BreakerSnapshot, BreakerState
from app.lifespan import AppState

router = APIRouter(tags=["health"])

HEALTH_JSON = "application/health+json"
_LIVE = b'{"status":"pass"}'
PASS, WARN, FAIL = "pass", "warn", "fail"
# What readiness requires; every other check can only warn.
_READINESS = frozenset({"database:responseTime", "redis:responseTime", "lifecycle:draining"})
_RANK = {PASS: 0, WARN: 1, FAIL: 2}

# Checks still running after their budget: kept referenced until they end.
_abandoned: set[asyncio.Task[Any]] = set()


@dataclass(slots=True)
class Check:
    """One entry of `checks` ("component:measurement" -> list of these)."""

    key: str
    component_type: str
    status: str
    observed_value: Any = None
    observed_unit: str | None = None
    component_id: str | None = None
    output: str | None = None
    at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"componentType": self.component_type}
        if self.component_id is not None:
            body["componentId"] = self.component_id
        if self.observed_value is not None:
            body["observedValue"] = self.observed_value
        if self.observed_unit is not None:
            body["observedUnit"] = self.observed_unit
        body["status"] = self.status
        body["time"] = datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds")
        if self.output:
            body["output"] = self.output
        return body


def _worst(statuses: list[str]) -> str:
    return max(statuses, key=_RANK.__getitem__, default=PASS)


def _checks_json(checks: list[Check]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for check in checks:
        grouped.setdefault(check.key, []).append(check.as_json())
    return grouped


# --- bounded, concurrent dependency checks ------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    value: Any = None
    error: str | None = None


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def _within(
    jobs: dict[str, Callable[[], Awaitable[Any]]], budget: float
) -> dict[str, _Outcome]:
    """Run every job at once; whatever has not answered after `budget` s is a failure.

    Not `asyncio.timeout`: that waits for a cancelled check to finish cancelling,
    and a check stuck in a driver's cleanup would hold the endpoint with it.
    """
    tasks = {name: asyncio.ensure_future(job()) for name, job in jobs.items()}
    try:
        if tasks:
            await asyncio.wait(tasks.values(), timeout=budget)
    finally:
        for task in tasks.values():
            if not task.done():
                task.cancel()
                _abandoned.add(task)
                task.add_done_callback(_forget)
    outcomes: dict[str, _Outcome] = {}
    for name, task in tasks.items():
        if not task.done() or task.cancelled():
            outcomes[name] = _Outcome(error=f"no answer within {budget:g} s")
        elif (error := task.exception()) is not None:
            outcomes[name] = _Outcome(error=_describe(error))
        else:
            outcomes[name] = _Outcome(value=task.result())
    return outcomes


@cache
def expected_migrations(backend: str) -> tuple[str, ...]:
    """The migration versions this build ships for `backend` (file names, sorted)."""
    folder = resources.files("app.db") / "migrations" / backend
    names = (entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    return tuple(sorted(name.removesuffix(".sql") for name in names))


@dataclass(frozen=True, slots=True)
class _DatabaseReading:
    millis: float
    missing: tuple[str, ...]


async def _read_database(state: AppState) -> _DatabaseReading:
    started = time.perf_counter()
    applied = set(await state.repository.applied_migrations())
    millis = (time.perf_counter() - started) * 1000
    expected = expected_migrations(state.repository.backend)
    return _DatabaseReading(millis, tuple(v for v in expected if v not in applied))


async def _ping_redis(state: AppState) -> float:
    # The health client waits up to the health-check timeout; the request path's
    # client gives up after the Redis budget (50 ms), which a Redis that is merely
    # slow for a moment would exceed on every replica at once.
    client = state.health_redis or state.redis
    assert client is not None
    started = time.perf_counter()
    await client.ping()
    return (time.perf_counter() - started) * 1000


def _breakers(state: AppState) -> dict[str, Any]:
    breakers: dict[str, Any] = getattr(state, "breakers", None) or {}
    return breakers


async def _dependencies(state: AppState) -> list[Check]:
    """Database, Redis and breaker states, read concurrently within the budget."""
    timeout = state.settings.health.check_timeout_seconds
    jobs: dict[str, Callable[[], Awaitable[Any]]] = {"database": lambda: _read_database(state)}
    if state.redis is not None:
        jobs["redis"] = lambda: _ping_redis(state)
    for name, breaker in _breakers(state).items():
        jobs[f"breaker:{name}"] = breaker.snapshot
    outcomes = await _within(jobs, timeout)
    checks = [_database_check(state, outcomes["database"])]
    checks.append(_redis_check(state, outcomes.get("redis")))
    for name in _breakers(state):
        checks.append(_breaker_check(name, outcomes[f"breaker:{name}"]))
    return checks


class _SharedDependencies:
    """One round of dependency checks shared by concurrent requests, reused for
    `max_age` seconds: a burst of probes costs one round, and never exhausts a pool."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.max_age = state.settings.health.cache_seconds
        self._task: asyncio.Task[list[Check]] | None = None
        self._at = 0.0

    async def read(self) -> list[Check]:
        task = self._task
        fresh = task is not None and task.done() and time.monotonic() - self._at < self.max_age
        if task is None or (task.done() and not fresh):
            self._at = time.monotonic()
            task = self._task = asyncio.ensure_future(_dependencies(self.state))
        # Shielded: a caller that goes away does not cancel the others' round.
        return list(await asyncio.shield(task))


def _shared_dependencies(request: Request, state: AppState) -> _SharedDependencies:
    shared = getattr(request.app.state, "health_dependencies", None)
    if not isinstance(shared, _SharedDependencies) or shared.state is not state:
        shared = _SharedDependencies(state)
        request.app.state.health_dependencies = shared
    return shared


def _database_check(state: AppState, outcome: _Outcome) -> Check:
    backend = state.repository.backend
    if outcome.error is not None:
        record_dependency_error("database", "health_check")
        return Check("database:responseTime", "datastore", FAIL, None, "ms", backend, outcome.error)
    reading: _DatabaseReading = outcome.value
    if reading.missing:
        output = "migrations not applied: " + ", ".join(reading.missing)
        return Check("database:responseTime", "datastore", FAIL, None, "ms", backend, output)
    return Check(
        "database:responseTime", "datastore", PASS, round(reading.millis, 3), "ms", backend
    )


def _redis_check(state: AppState, outcome: _Outcome | None) -> Check:
    if outcome is None:
        return Check(
            "redis:responseTime",
            "datastore",
            PASS,
            component_id="in-process",
            output="REDIS_URL not set: shared state is kept in this process",
        )
    if outcome.error is not None:
        record_dependency_error("redis", "health_check")
        status = FAIL if state.settings.health.redis_required else WARN
        return Check("redis:responseTime", "datastore", status, None, "ms", "redis", outcome.error)
    return Check("redis:responseTime", "datastore", PASS, round(outcome.value, 3), "ms", "redis")


def _breaker_check(name: str, outcome: _Outcome) -> Check:
    if outcome.error is not None:
        return Check("circuitBreaker:state", "component", WARN, None, None, name, outcome.error)
    snapshot: BreakerSnapshot = outcome.value
    state = snapshot.state
    output = None
    if state is BreakerState.OPEN and snapshot.opened_until_seconds_from_now is not None:
        output = f"open; next probe in {snapshot.opened_until_seconds_from_now:.1f} s"
    elif state is BreakerState.HALF_OPEN:
        output = "half-open: probing the upstream"
    if snapshot.store_degraded:
        output = ((output + "; ") if output else "") + "state is in-process (Redis unavailable)"
    status = PASS if state is BreakerState.CLOSED else WARN
    return Check("circuitBreaker:state", "component", status, state.value, None, name, output)


# --- local (no I/O) checks ---------------------------------------------------------------


def _provider_checks(state: AppState) -> list[Check]:
    settings = state.settings
    checks = []
    for name, configured, variable in (
        ("openai", settings.openai.configured, "OPENAI_API_KEY"),
        ("replicate", settings.replicate.configured, "REPLICATE_API_TOKEN"),
    ):
        checks.append(
            Check(
                f"{name}:credentials",
                "component",
                PASS if configured else WARN,
                "configured" if configured else "missing",
                output=None if configured else f"{variable} not set: the next rung serves",
            )
        )
    return checks


def _operations_checks(state: AppState, ops: Operations | None) -> list[Check]:
    checks = [
        Check(
            "lifecycle:draining",
            "component",
            FAIL if state.draining else PASS,
            state.draining,
            output="shutting down: finishing in-flight requests" if state.draining else None,
        )
    ]
    if ops is None:
        return checks
    counters = ops.rate_counters
    if counters is not None:
        if counters.degraded:
            checks.append(
                Check(
                    "rateLimiter:storage",
                    "component",
                    WARN,
                    "in-process",
                    output=f"Redis unavailable ({counters.last_error}): limits count per process",
                )
            )
        else:
            where = "redis" if counters.shared else "in-process"
            checks.append(Check("rateLimiter:storage", "component", PASS, where))
    switch = ops.maintenance
    checks.append(
        Check(
            "maintenance:mode",
            "component",
            WARN if switch.on else PASS,
            switch.on,
            output=f"on (by the {switch.source})" if switch.on else None,
        )
    )
    return checks


def _system_checks(state: AppState, ops: Operations | None) -> list[Check]:
    cfg = state.settings.health
    uptime = time.monotonic() - state.started_at
    checks = [Check("uptime", "system", PASS, round(uptime, 1), "s")]
    sample = ops.system.latest if ops is not None else None
    if sample is None:
        return checks
    at = sample.taken_at

    def percent(key: str, value: float | None, warn_above: float, of: str = "") -> Check:
        if value is None:
            return Check(key, "system", WARN, None, "percent", output="could not be read", at=at)
        status = WARN if value > warn_above else PASS
        notes = [f"of the {of}" if of else "", f"above {warn_above:g}%" if status == WARN else ""]
        output = "; ".join(n for n in notes if n) or None
        return Check(key, "system", status, round(value, 1), "percent", output=output, at=at)

    # In a container: CPU of its quota and memory of its limit, not of the node.
    basis = "container's limit" if sample.basis == "container" else "host"
    checks += [
        percent("cpu:utilization", sample.cpu_percent, cfg.cpu_warn_percent, basis),
        percent("memory:utilization", sample.memory_percent, cfg.memory_warn_percent, basis),
        percent("disk:utilization", sample.disk_percent, cfg.disk_warn_percent),
        Check("process:residentMemory", "system", PASS, sample.rss_bytes, "bytes", at=at),
    ]
    return checks


def _operations(request: Request) -> Operations | None:
    ops = getattr(request.app.state, "operations", None)
    return ops if isinstance(ops, Operations) else None


def _app_state(request: Request) -> AppState | None:
    state = getattr(request.state, "app_state", None)
    return state if isinstance(state, AppState) else None


def _summary(check: Check) -> str:
    subject = check.key if check.component_id is None else f"{check.key} {check.component_id}"
    return f"{subject}: {check.output or check.observed_value}"


def _not_started() -> JSONResponse:
    body = {"status": FAIL, "failing": ["startup"], "output": "starting"}
    return JSONResponse(body, status_code=503, media_type=HEALTH_JSON)


# --- endpoints -------------------------------------------------------------------------------


@router.get("/health/live", response_class=Response)
async def live() -> Response:
    return Response(_LIVE, media_type=HEALTH_JSON)


@router.get("/health/ready", response_class=JSONResponse)
async def ready(request: Request) -> Response:
    state = _app_state(request)
    if state is None:
        return _not_started()
    ops = _operations(request)
    checks = await _shared_dependencies(request, state).read()
    checks += _operations_checks(state, ops) + _provider_checks(state)
    required = [c for c in checks if c.key in _READINESS]
    warnings = [c for c in checks if c.key not in _READINESS and c.status != PASS]
    failing = sorted({c.key.split(":")[0] for c in required if c.status == FAIL})
    status = FAIL if failing else _worst([c.status for c in required + warnings])
    body: dict[str, Any] = {"status": status, "checks": _checks_json(required + warnings)}
    if failing:
        body["failing"] = failing
    if warnings:
        body["warnings"] = [_summary(c) for c in warnings]
    return JSONResponse(body, status_code=503 if failing else 200, media_type=HEALTH_JSON)


@router.get("/health", response_class=JSONResponse)
async def health(request: Request) -> Response:
    state = _app_state(request)
    if state is None:
        return _not_started()
    ops = _operations(request)
    checks = await _shared_dependencies(request, state).read()
    checks += _operations_checks(state, ops)
    checks += _provider_checks(state)
    checks += _system_checks(state, ops)
    status = _worst([c.status for c in checks])
    body = {
        "status": status,
        "version": request.app.version,
        "releaseId": state.settings.sentry.release or request.app.version,
        "serviceId": state.settings.service_name,
        "description": "Story service: writes, illustrates and keeps children's stories.",
        "checks": _checks_json(checks),
    }
    return JSONResponse(body, status_code=503 if status == FAIL else 200, media_type=HEALTH_JSON)
