"""The checks a health report is made of, in the IETF health-check format.

A `Check` is one entry of a report's `checks` ("component:measurement" -> list
of these), as draft-inadarei-api-health-check describes it. `within` runs the
checks that do I/O concurrently under one time budget; the functions below turn
a reading (or its failure) into a `Check`. Nothing here calls an upstream
provider, and nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.core.ratelimit import FailoverCounters
from app.core.resilience import BreakerSnapshot, BreakerState
from app.platform.config import HealthSettings, Settings
from app.platform.maintenance import MaintenanceSwitch
from app.platform.metrics import record_dependency_error
from app.platform.system import SystemSample

PASS, WARN, FAIL = "pass", "warn", "fail"
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

    def summary(self) -> str:
        subject = self.key if self.component_id is None else f"{self.key} {self.component_id}"
        return f"{subject}: {self.output or self.observed_value}"


def worst(statuses: list[str]) -> str:
    return max(statuses, key=_RANK.__getitem__, default=PASS)


def checks_json(checks: list[Check]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for check in checks:
        grouped.setdefault(check.key, []).append(check.as_json())
    return grouped


# --- bounded, concurrent dependency checks ------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a dependency check returned, or why it did not."""

    value: Any = None
    error: str | None = None


# Where a dependency lives is not the caller's business: driver errors name it
# ("Error 111 connecting to redis-0.internal:6379", "('10.0.0.5', 5432)"), and
# /health is readable by whoever reaches the port. Most specific pattern first.
_ADDRESSES = (
    re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+"),  # a URL (with its credentials, if any)
    re.compile(r"\(\s*'[^']*'\s*,\s*\d+(?:\s*,\s*\d+)*\s*\)"),  # a socket address tuple
    re.compile(r"\b(?:host(?: name)?|server(?: at)?|address) \"[^\"]*\""),  # host "db-0"
    re.compile(r"(?<![\w.:-])(?:\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):\d{1,5}\b"),
    re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),  # IPv4
    re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])"),  # IPv6
)
REDACTED = "<address>"


def redact_addresses(text: str) -> str:
    """`text` with host names, addresses, ports and URLs replaced by `<address>`."""
    for pattern in _ADDRESSES:
        text = pattern.sub(REDACTED, text)
    return text


def _describe(error: BaseException) -> str:
    text = redact_addresses(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def within(
    jobs: dict[str, Callable[[], Awaitable[Any]]], budget: float
) -> dict[str, Outcome]:
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
    outcomes: dict[str, Outcome] = {}
    for name, task in tasks.items():
        if not task.done() or task.cancelled():
            outcomes[name] = Outcome(error=f"no answer within {budget:g} s")
        elif (error := task.exception()) is not None:
            outcomes[name] = Outcome(error=_describe(error))
        else:
            outcomes[name] = Outcome(value=task.result())
    return outcomes


@dataclass(frozen=True, slots=True)
class DatabaseReading:
    millis: float
    missing: tuple[str, ...]


def database_check(backend: str, outcome: Outcome) -> Check:
    if outcome.error is not None:
        record_dependency_error("database", "health_check")
        return Check("database:responseTime", "datastore", FAIL, None, "ms", backend, outcome.error)
    reading: DatabaseReading = outcome.value
    if reading.missing:
        output = "migrations not applied: " + ", ".join(reading.missing)
        return Check("database:responseTime", "datastore", FAIL, None, "ms", backend, output)
    return Check(
        "database:responseTime", "datastore", PASS, round(reading.millis, 3), "ms", backend
    )


def redis_check(outcome: Outcome | None, *, required: bool) -> Check:
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
        status = FAIL if required else WARN
        return Check("redis:responseTime", "datastore", status, None, "ms", "redis", outcome.error)
    return Check("redis:responseTime", "datastore", PASS, round(outcome.value, 3), "ms", "redis")


def breaker_check(name: str, outcome: Outcome) -> Check:
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
    if snapshot.forced:
        output = snapshot.forced + ((": " + output) if output else "")
    status = PASS if state is BreakerState.CLOSED and not snapshot.forced else WARN
    return Check("circuitBreaker:state", "component", status, state.value, None, name, output)


# --- local (no I/O) checks ---------------------------------------------------------------


def provider_checks(settings: Settings) -> list[Check]:
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


def draining_check(draining: bool) -> Check:
    return Check(
        "lifecycle:draining",
        "component",
        FAIL if draining else PASS,
        draining,
        output="shutting down: finishing in-flight requests" if draining else None,
    )


def rate_limiter_check(counters: FailoverCounters) -> Check:
    if counters.degraded:
        return Check(
            "rateLimiter:storage",
            "component",
            WARN,
            "in-process",
            output=f"Redis unavailable ({redact_addresses(str(counters.last_error))}): "
            "limits count per process",
        )
    where = "redis" if counters.shared else "in-process"
    return Check("rateLimiter:storage", "component", PASS, where)


def maintenance_check(switch: MaintenanceSwitch) -> Check:
    return Check(
        "maintenance:mode",
        "component",
        WARN if switch.on else PASS,
        switch.on,
        output=f"on (by the {switch.source})" if switch.on else None,
    )


def system_checks(uptime: float, sample: SystemSample | None, cfg: HealthSettings) -> list[Check]:
    checks = [Check("uptime", "system", PASS, round(uptime, 1), "s")]
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
