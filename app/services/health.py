"""What probes and operators are told about this instance: readiness and the full report.

- readiness: can this instance serve? Migrations applied, database reachable,
  Redis reachable when configured and `HEALTH_REDIS_REQUIRED`, not draining
  after SIGTERM. Failing names what fails. An open circuit breaker, a missing
  provider key, in-process rate limiting or maintenance mode are warnings,
  never a failure: taking every replica out of the load balancer because OpenAI
  is down would turn a degraded service into none.
- the report (`/health`): Redis and database round trips, provider keys
  configured or not (never the keys), breaker states, CPU, memory and disk (from
  the background sampler), process RSS, uptime, version.

Dependency checks run concurrently, each bounded by `HEALTH_CHECK_TIMEOUT_SECONDS`;
one that does not answer in time is reported as failing and left to finish in
the background, so a report is ready within its budget even when Redis or the
database hangs. Concurrent callers share one round of checks, and its result is
reused for `HEALTH_CACHE_SECONDS` (1 s): a probe storm costs one round per
interval, never a pool. Liveness is not here: it reads nothing
(`app.routers.health_detailed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from app.core.ratelimit import FailoverCounters
from app.core.resilience import CircuitBreaker
from app.db.repository import StoryRepository, migration_versions
from app.platform.config import Settings
from app.platform.maintenance import MaintenanceSwitch
from app.platform.shutdown import Lifecycle
from app.platform.system import SystemMonitor
from app.services.health_checks import (
    FAIL,
    PASS,
    Check,
    DatabaseReading,
    breaker_check,
    checks_json,
    database_check,
    draining_check,
    maintenance_check,
    provider_checks,
    rate_limiter_check,
    redis_check,
    system_checks,
    within,
    worst,
)

# What readiness requires; every other check can only warn.
_READINESS = frozenset({"database:responseTime", "redis:responseTime", "lifecycle:draining"})


@dataclass(frozen=True, slots=True)
class HealthReport:
    """A health+json document and whether it means "do not send me traffic"."""

    body: dict[str, Any]
    failing: bool


class HealthService:
    def __init__(
        self,
        settings: Settings,
        *,
        version: str,
        repository: StoryRepository,
        redis: aioredis.Redis | None,
        breakers: Mapping[str, CircuitBreaker],
        rate_counters: FailoverCounters,
        maintenance: MaintenanceSwitch,
        system: SystemMonitor,
        lifecycle: Lifecycle,
    ) -> None:
        self.settings = settings
        self.version = version
        self.repository = repository
        # Its own client, with the health-check timeout: the request path's client
        # gives up after the Redis budget (50 ms), which a Redis that is merely slow
        # for a moment would exceed on every replica at once.
        self.redis = redis
        self.breakers = breakers
        self.rate_counters = rate_counters
        self.maintenance = maintenance
        self.system = system
        self.lifecycle = lifecycle
        self._round: asyncio.Task[list[Check]] | None = None
        self._round_at = 0.0

    async def readiness(self) -> HealthReport:
        checks = await self._shared_round() + self._local_checks()
        required = [c for c in checks if c.key in _READINESS]
        warnings = [c for c in checks if c.key not in _READINESS and c.status != PASS]
        failing = sorted({c.key.split(":")[0] for c in required if c.status == FAIL})
        status = FAIL if failing else worst([c.status for c in required + warnings])
        body: dict[str, Any] = {"status": status, "checks": checks_json(required + warnings)}
        if failing:
            body["failing"] = failing
        if warnings:
            body["warnings"] = [c.summary() for c in warnings]
        return HealthReport(body, failing=bool(failing))

    async def report(self) -> HealthReport:
        checks = await self._shared_round() + self._local_checks()
        uptime = time.monotonic() - self.lifecycle.started_at
        checks += system_checks(uptime, self.system.latest, self.settings.health)
        status = worst([c.status for c in checks])
        body = {
            "status": status,
            "version": self.version,
            "releaseId": self.settings.sentry.release or self.version,
            "serviceId": self.settings.service_name,
            "description": "Story service: writes, illustrates and keeps children's stories.",
            "checks": checks_json(checks),
        }
        return HealthReport(body, failing=status == FAIL)

    def _local_checks(self) -> list[Check]:
        return [
            draining_check(self.lifecycle.draining),
            rate_limiter_check(self.rate_counters),
            maintenance_check(self.maintenance),
            *provider_checks(self.settings),
        ]

    async def _shared_round(self) -> list[Check]:
        task = self._round
        fresh = (
            task is not None
            and task.done()
            and time.monotonic() - self._round_at < self.settings.health.cache_seconds
        )
        if task is None or (task.done() and not fresh):
            self._round_at = time.monotonic()
            task = self._round = asyncio.ensure_future(self._dependencies())
        # Shielded: a caller that goes away does not cancel the others' round.
        return list(await asyncio.shield(task))

    async def _dependencies(self) -> list[Check]:
        """Database, Redis and breaker states, read concurrently within the budget."""
        jobs: dict[str, Callable[[], Awaitable[Any]]] = {"database": self._read_database}
        if self.redis is not None:
            jobs["redis"] = self._ping_redis
        for name, breaker in self.breakers.items():
            jobs[f"breaker:{name}"] = breaker.snapshot
        outcomes = await within(jobs, self.settings.health.check_timeout_seconds)
        checks = [database_check(self.repository.backend, outcomes["database"])]
        checks.append(
            redis_check(outcomes.get("redis"), required=self.settings.health.redis_required)
        )
        for name in self.breakers:
            checks.append(breaker_check(name, outcomes[f"breaker:{name}"]))
        return checks

    async def _read_database(self) -> DatabaseReading:
        started = time.perf_counter()
        applied = set(await self.repository.applied_migrations())
        millis = (time.perf_counter() - started) * 1000
        expected = migration_versions(self.repository.backend)
        return DatabaseReading(millis, tuple(v for v in expected if v not in applied))

    async def _ping_redis(self) -> float:
        assert self.redis is not None
        started = time.perf_counter()
        await self.redis.ping()
        return (time.perf_counter() - started) * 1000
