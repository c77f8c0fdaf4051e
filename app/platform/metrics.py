"""Prometheus metrics: what the service counts, and the hooks that count it.

Every metric the service exposes is defined here, once, named `story_*`. Code
elsewhere calls the small `record_*` functions (or hands `PrometheusObserver` to
the resilience layer) and never touches prometheus-client directly, so the names
that `deploy/prometheus/alerts.yml` relies on live in one place.

Several worker processes (`uvicorn --workers N`, `WEB_CONCURRENCY`): set
`PROMETHEUS_MULTIPROC_DIR` to an empty directory private to this instance
(a tmpfs in containers) BEFORE the server starts; prometheus-client then keeps
every worker's values in files there and `/metrics` sums them (gauges combine as
their `multiprocess_mode` says). Empty the directory whenever the server starts,
or counters of dead processes live on. Without the variable, the default
in-process registry is used (and also exports `process_*` and `python_*`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = [
    "CONTENT_TYPE",
    "PrometheusObserver",
    "multiprocess_mode",
    "record_cache",
    "record_dependency_error",
    "record_fallback",
    "record_maintenance",
    "record_moderation",
    "record_rate_limit_storage",
    "record_rate_limited",
    "record_story_served",
    "record_system",
    "record_upstream_call",
    "refresh_breaker_states",
    "render_metrics",
    "set_breaker_state",
    "set_build_info",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# The classic text format: every Prometheus 2.x server reads it (client 0.26 defaults to 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# `*_created` timestamps double the exposition and no rule here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

# --- HTTP ---------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "story_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "story_http_request_duration_seconds",
    "Time from request to the end of the response, by method, route template and status.",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "story_http_requests_in_flight",
    "Requests being served right now.",
    multiprocess_mode="livesum",
)
EVENT_LOOP_LAG = Gauge(
    "story_event_loop_lag_seconds",
    "How late the worker's event loop runs its timers (smoothed): its own CPU saturation.",
    multiprocess_mode="livemax",
)
RATE_LIMITED = Counter(
    "story_rate_limited_requests_total",
    "Requests refused with 429 by the rate limiter, by route template.",
    ["route"],
)

# --- upstreams and the degradation ladder -----------------------------------------------

UPSTREAM_CALLS = Counter(
    "story_upstream_calls_total",
    "Calls to an upstream provider, by provider, operation and outcome.",
    ["provider", "operation", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "story_upstream_call_duration_seconds",
    "Duration of calls to an upstream provider, by provider, operation and outcome.",
    ["provider", "operation", "outcome"],
    buckets=_UPSTREAM_BUCKETS,
)
STORIES_SERVED = Counter(
    "story_stories_served_total",
    "Stories returned to callers, by the rung that wrote them and whether degraded.",
    ["provider", "degraded"],
)
FALLBACKS = Counter(
    "story_fallbacks_total",
    "Times a cheaper fallback replaced a failed step, by rung.",
    ["rung"],
)
CACHE = Counter(
    "story_cache_requests_total",
    "Story cache lookups, by result (hit, miss, error).",
    ["result"],
)
MODERATION = Counter(
    "story_moderation_total",
    "Content checks, by what was checked (prompt, story), the verdict (passed, flagged,"
    " unavailable) and who checked it (openai, local, none).",
    ["where", "verdict", "checker"],
)

# --- resilience -------------------------------------------------------------------------

BREAKER_STATE = Gauge(
    "story_circuit_breaker_state",
    "1 for the state each circuit breaker is in, 0 for the others.",
    ["breaker", "state"],
    multiprocess_mode="livemostrecent",
)
BREAKER_TRANSITIONS = Counter(
    "story_circuit_breaker_transitions_total",
    "Circuit breaker state changes caused by this process.",
    ["breaker", "from_state", "to_state"],
)
BREAKER_REJECTIONS = Counter(
    "story_circuit_breaker_rejections_total",
    "Calls refused by an open (or probe-saturated) circuit breaker.",
    ["breaker"],
)
RETRIES = Counter(
    "story_retries_total",
    "Retries of an upstream call (each retry once).",
    ["name"],
)
RETRY_BUDGET_EXHAUSTED = Counter(
    "story_retry_budget_exhausted_total",
    "Retries refused because the retry budget was spent.",
    ["name"],
)
BULKHEAD_REJECTIONS = Counter(
    "story_bulkhead_rejections_total",
    "Calls refused because an upstream's bulkhead was full.",
    ["name"],
)
BREAKER_STORE_FALLBACKS = Counter(
    "story_breaker_store_fallbacks_total",
    "Times breaker state moved from Redis to in-process because Redis failed.",
)
BREAKER_STORE_DEGRADED = Gauge(
    "story_breaker_store_degraded",
    "1 while breaker state is in-process because Redis failed.",
    multiprocess_mode="livemax",
)

# --- admission and upstream quotas (recorded by app.providers.registry) ------------------

ADMISSION_LIMIT = Gauge(
    "story_admission_limit", "Adaptive concurrency limit, by upstream operation.", ["name"],
    multiprocess_mode="livesum",
)  # fmt: skip
ADMISSION_IN_FLIGHT = Gauge(
    "story_admission_in_flight", "Calls admitted, not finished, by upstream operation.",
    ["name"], multiprocess_mode="livesum",
)  # fmt: skip
ADMISSION_QUEUED = Gauge(
    "story_admission_queued", "Callers waiting for a slot, by upstream operation.", ["name"],
    multiprocess_mode="livesum",
)  # fmt: skip
ADMISSION_SHED = Counter(
    "story_admission_shed_total",
    "Calls shed by admission (queue_full, no_time, expected_wait, wait_timeout).",
    ["name", "reason"],
)
QUOTA_WAITS = Counter(
    "story_quota_waits_total", "Calls that waited for their account's quota.", ["provider"]
)
QUOTA_REFUSALS = Counter(
    "story_quota_refusals_total",
    "Calls sent down the ladder because the account's quota (requests, tokens) was spent.",
    ["provider", "reason"],
)
QUOTA_STORAGE_DEGRADED = Gauge(
    "story_quota_storage_degraded", "1 while a quota is spent in-process (Redis failed).",
    ["provider"], multiprocess_mode="livemax",
)  # fmt: skip

# --- dependencies and the rate limiter's storage ---------------------------------------

DEPENDENCY_ERRORS = Counter(
    "story_dependency_errors_total",
    "Errors and timeouts talking to Redis or the database, by dependency and operation.",
    ["dependency", "operation"],
)
RATE_LIMIT_STORAGE_FALLBACKS = Counter(
    "story_rate_limit_storage_fallbacks_total",
    "Times rate-limit counting moved from Redis to in-process because Redis failed.",
)
RATE_LIMIT_STORAGE_DEGRADED = Gauge(
    "story_rate_limit_storage_degraded",
    "1 while rate limits are counted in-process because Redis failed.",
    multiprocess_mode="livemax",
)
MAINTENANCE = Gauge(
    "story_maintenance_mode",
    "1 while maintenance mode is on.",
    multiprocess_mode="livemax",
)

# --- process and system (sampled in the background, see app.platform.system) ----------------

PROCESS_RSS = Gauge(
    "story_process_resident_memory_bytes",
    "Resident memory of the server's processes (summed over workers).",
    multiprocess_mode="livesum",
)
SYSTEM_CPU = Gauge(
    "story_system_cpu_percent",
    "Host CPU utilisation over the last sampling interval, percent.",
    multiprocess_mode="livemax",
)
SYSTEM_MEMORY = Gauge(
    "story_system_memory_percent",
    "Host memory in use, percent.",
    multiprocess_mode="livemax",
)
SYSTEM_DISK = Gauge(
    "story_system_disk_percent",
    "Disk space in use on the data volume, percent.",
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "story_build_info",
    "Always 1; the labels say which version runs.",
    ["version"],
    multiprocess_mode="livemax",
)


# --- recording hooks ---------------------------------------------------------------------


def record_upstream_call(provider: str, operation: str, outcome: str, seconds: float) -> None:
    """One call to an upstream (`outcome`: ok, timeout, error, rate_limited, ...)."""
    UPSTREAM_CALLS.labels(provider, operation, outcome).inc()
    UPSTREAM_LATENCY.labels(provider, operation, outcome).observe(max(0.0, seconds))


def record_story_served(provider: str, degraded: bool) -> None:
    """A story returned to a caller, by the rung that wrote it."""
    STORIES_SERVED.labels(provider, "true" if degraded else "false").inc()


def record_fallback(rung: str) -> None:
    """The degradation ladder (or a `graceful_degradation`) used `rung` instead."""
    FALLBACKS.labels(rung).inc()


def record_cache(result: str) -> None:
    """A story cache lookup: `hit`, `miss` or `error`."""
    CACHE.labels(result).inc()


def record_moderation(where: str, verdict: str, checker: str) -> None:
    """A content check of a prompt or a story (`app.services.moderation`)."""
    MODERATION.labels(where, verdict, checker).inc()


def record_dependency_error(dependency: str, operation: str) -> None:
    """Redis or the database failed (or timed out) during `operation`."""
    DEPENDENCY_ERRORS.labels(dependency, operation).inc()


def record_rate_limited(route: str) -> None:
    RATE_LIMITED.labels(route).inc()


def record_rate_limit_storage(degraded: bool, *, redis_error: bool = True) -> None:
    """The rate limiter moved to in-process counters (True) or back to Redis (False).

    `redis_error=False`: it moved without a Redis error of its own (another part of
    the process saw Redis fail, and counted that error), so none is counted here.
    """
    if degraded:
        RATE_LIMIT_STORAGE_FALLBACKS.inc()
        if redis_error:
            record_dependency_error("redis", "rate_limit")
    RATE_LIMIT_STORAGE_DEGRADED.set(1 if degraded else 0)


def record_maintenance(on: bool) -> None:
    MAINTENANCE.set(1 if on else 0)


def record_system(
    *, rss_bytes: int, cpu_percent: float, memory_percent: float, disk_percent: float | None
) -> None:
    PROCESS_RSS.set(rss_bytes)
    SYSTEM_CPU.set(cpu_percent)
    SYSTEM_MEMORY.set(memory_percent)
    if disk_percent is not None:
        SYSTEM_DISK.set(disk_percent)


def record_loop_lag(seconds: float) -> None:
    EVENT_LOOP_LAG.set(seconds)


def set_build_info(version: str) -> None:
    BUILD_INFO.labels(version).set(1)


# The states of `app.core.resilience.BreakerState`, by value: one gauge series each.
BREAKER_STATES = ("closed", "open", "half_open")


class _Snapshot(Protocol):
    @property
    def state(self) -> str: ...


class _SnapshotSource(Protocol):
    """A circuit breaker, as far as its state gauge is concerned."""

    async def snapshot(self) -> _Snapshot: ...


def set_breaker_state(name: str, state: str) -> None:
    for candidate in BREAKER_STATES:
        BREAKER_STATE.labels(name, candidate).set(1 if candidate == state else 0)


async def refresh_breaker_states(
    breakers: Mapping[str, _SnapshotSource], timeout_seconds: float = 0.25
) -> None:
    """Set each breaker's state gauge from its (possibly shared) store.

    Transitions are reported only by the process that caused them; reading the
    store in the background (every METRICS_BREAKER_REFRESH_SECONDS, see
    `app.lifespan`) makes every worker show the state all of them share, while a
    scrape reads nothing but memory. A breaker whose store does not answer in
    time keeps its last value.
    """
    if not breakers:
        return

    async def one(name: str, breaker: _SnapshotSource) -> None:
        try:
            async with asyncio.timeout(timeout_seconds):
                snapshot = await breaker.snapshot()
        except Exception:
            return
        set_breaker_state(name, snapshot.state)

    await asyncio.gather(*(one(name, breaker) for name, breaker in breakers.items()))


class PrometheusObserver:
    """Counts every resilience event (an `app.core.resilience.ResilienceObserver`).

    Pass it to the resilience layer beside the logging observer, e.g.
    `CompositeObserver(LoggingObserver(), PrometheusObserver())`.
    """

    def breaker_transition(self, name: str, from_state: str, to_state: str) -> None:
        # States arrive as `BreakerState`, a `StrEnum`: its values are these strings.
        BREAKER_TRANSITIONS.labels(name, str(from_state), str(to_state)).inc()
        set_breaker_state(name, to_state)

    def breaker_rejected(self, name: str, retry_after: float) -> None:
        BREAKER_REJECTIONS.labels(name).inc()

    def retry(self, name: str, attempt: int, delay: float, error: BaseException) -> None:
        RETRIES.labels(name).inc()

    def budget_exhausted(self, name: str) -> None:
        RETRY_BUDGET_EXHAUSTED.labels(name).inc()

    def bulkhead_rejected(self, name: str) -> None:
        BULKHEAD_REJECTIONS.labels(name).inc()

    def fallback(self, name: str, error: BaseException) -> None:
        FALLBACKS.labels(name).inc()

    def store_fallback(self, error: BaseException) -> None:
        BREAKER_STORE_FALLBACKS.inc()
        BREAKER_STORE_DEGRADED.set(1)
        record_dependency_error("redis", "breaker_store")

    def store_recovered(self) -> None:
        BREAKER_STORE_DEGRADED.set(0)


# --- exposition --------------------------------------------------------------------------


def multiprocess_mode() -> bool:
    """True when prometheus-client keeps values in PROMETHEUS_MULTIPROC_DIR files."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


async def render_metrics() -> bytes:
    """The Prometheus text exposition of every metric (all workers' in multiprocess mode)."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        # Reads one file per worker and metric: file I/O, kept off the event loop.
        return await asyncio.to_thread(generate_latest, registry)
    return generate_latest(REGISTRY)


def mark_process_dead() -> None:
    """At shutdown in multiprocess mode: drop this worker's live gauges."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
