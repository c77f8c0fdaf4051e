"""`/metrics` in the Prometheus text format: what is counted, by what labels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.core.resilience import BreakerState
from app.platform import metrics
from app.platform.config import RateLimitSettings
from tests.ops.apps import ops_settings, running
from tests.ops.servers import app_server


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in an exposition; 0.0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def current(metric: str, **labels: str) -> float:
    """The value of one series in this process's registry; 0.0 when absent."""
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def test_metrics_are_served_in_the_prometheus_text_format(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE story_http_requests_total counter" in response.text


async def test_requests_are_counted_by_route_template_and_status(tmp_path: Path) -> None:
    labels = {"method": "GET", "route": "/v1/stories/{story_id}", "status": "404"}
    before = current("story_http_requests_total", **labels)
    async with running(ops_settings(tmp_path)) as (_, client):
        for n in range(3):
            await client.get(f"/v1/stories/6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e7{n}")
        text = (await client.get("/metrics")).text

    assert sample(text, "story_http_requests_total", **labels) == before + 3
    assert sample(text, "story_http_request_duration_seconds_count", **labels) == before + 3
    assert "6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e70" not in text


async def test_unknown_paths_share_one_series(tmp_path: Path) -> None:
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    before = current("story_http_requests_total", **labels)
    async with running(ops_settings(tmp_path)) as (_, client):
        await client.get("/no/such/path/1")
        await client.get("/no/such/path/2")

    assert current("story_http_requests_total", **labels) == before + 2


async def test_rate_limited_requests_are_counted_by_route(tmp_path: Path) -> None:
    before = current("story_rate_limited_requests_total", route="/v1/recommendations")
    settings = ops_settings(
        tmp_path,
        rate_limit=RateLimitSettings(_env_file=None, default="1/minute"),
    )
    async with running(settings) as (_, client):
        for _ in range(3):
            await client.get("/v1/recommendations", params={"age": 6})

    assert current("story_rate_limited_requests_total", route="/v1/recommendations") == before + 2


async def test_the_in_flight_gauge_counts_the_scrape_itself(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        text = (await client.get("/metrics")).text

    assert sample(text, "story_http_requests_in_flight") >= 1


async def test_a_scrape_reads_breaker_states_from_memory_not_the_store(tmp_path: Path) -> None:
    # One background read at start, none after: what a scrape shows is the gauge.
    settings = ops_settings(
        tmp_path,
        openai_base_url="http://127.0.0.1:9/v1",
        metrics_breaker_refresh_seconds=3600,
        metrics_cache_seconds=0,
    )
    async with running(settings) as (app, client):
        breaker = app.state.app_state.breakers["openai:chat"]
        for _ in range(breaker.config.failure_threshold):
            await breaker.record_failure(await breaker.acquire())
        opened = (await client.get("/metrics")).text  # the transition set the gauge
        metrics.set_breaker_state("openai:chat", BreakerState.CLOSED)  # a stale value
        stale = (await client.get("/metrics")).text

    assert sample(opened, "story_circuit_breaker_state", breaker="openai:chat", state="open") == 1
    assert sample(stale, "story_circuit_breaker_state", breaker="openai:chat", state="closed") == 1


async def test_breaker_states_are_refreshed_from_the_store_in_the_background(
    tmp_path: Path,
) -> None:
    settings = ops_settings(
        tmp_path,
        openai_base_url="http://127.0.0.1:9/v1",
        metrics_breaker_refresh_seconds=0.05,
        metrics_cache_seconds=0,
    )
    async with running(settings) as (app, client):
        breaker = app.state.app_state.breakers["openai:chat"]
        for _ in range(breaker.config.failure_threshold):
            await breaker.record_failure(await breaker.acquire())
        metrics.set_breaker_state("openai:chat", BreakerState.CLOSED)  # a stale value
        for _ in range(400):  # bounded: the refresh runs every 0.05 s
            text = (await client.get("/metrics")).text
            if sample(text, "story_circuit_breaker_state", breaker="openai:chat", state="open"):
                break
            await asyncio.sleep(0.05)

    assert sample(text, "story_circuit_breaker_state", breaker="openai:chat", state="open") == 1
    assert sample(text, "story_circuit_breaker_state", breaker="openai:chat", state="closed") == 0


async def test_a_rendered_page_is_reused_for_metrics_cache_seconds(tmp_path: Path) -> None:
    labels = {"method": "GET", "route": "/v1/stories/{story_id}", "status": "404"}
    missing = "/v1/stories/6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e70"
    async with running(ops_settings(tmp_path, metrics_cache_seconds=3600)) as (_, client):
        first = (await client.get("/metrics")).text
        await client.get(missing)
        cached = (await client.get("/metrics")).text
    async with running(ops_settings(tmp_path, metrics_cache_seconds=0)) as (_, client):
        before = (await client.get("/metrics")).text
        await client.get(missing)
        fresh = (await client.get("/metrics")).text

    assert cached == first
    assert sample(fresh, "story_http_requests_total", **labels) == (
        sample(before, "story_http_requests_total", **labels) + 1
    )


async def test_process_and_system_figures_are_exported(tmp_path: Path) -> None:
    async with running(ops_settings(tmp_path)) as (_, client):
        text = (await client.get("/metrics")).text

    assert sample(text, "story_process_resident_memory_bytes") > 0
    assert 0 < sample(text, "story_system_memory_percent") <= 100
    assert sample(text, "story_build_info", version="0.1.0") == 1


def test_the_observer_counts_every_resilience_event() -> None:
    observer = metrics.PrometheusObserver()
    name = "test:observer"
    error = TimeoutError("upstream")

    observer.breaker_transition(name, BreakerState.CLOSED, BreakerState.OPEN)
    observer.breaker_rejected(name, 12.0)
    observer.retry(name, 1, 0.5, error)
    observer.retry(name, 2, 1.0, error)
    observer.budget_exhausted(name)
    observer.bulkhead_rejected(name)
    observer.fallback(name, error)

    assert (
        current(
            "story_circuit_breaker_transitions_total",
            breaker=name,
            from_state="closed",
            to_state="open",
        )
        == 1
    )
    assert current("story_circuit_breaker_state", breaker=name, state="open") == 1
    assert current("story_circuit_breaker_rejections_total", breaker=name) == 1
    assert current("story_retries_total", name=name) == 2
    assert current("story_retry_budget_exhausted_total", name=name) == 1
    assert current("story_bulkhead_rejections_total", name=name) == 1
    assert current("story_fallbacks_total", rung=name) == 1


def test_the_observer_marks_the_breaker_store_degraded_and_recovered() -> None:
    observer = metrics.PrometheusObserver()
    before = current("story_breaker_store_fallbacks_total")

    observer.store_fallback(ConnectionError("redis"))
    degraded = current("story_breaker_store_degraded")
    observer.store_recovered()

    assert current("story_breaker_store_fallbacks_total") == before + 1
    assert degraded == 1
    assert current("story_breaker_store_degraded") == 0


def test_recording_hooks_count_upstream_calls_stories_and_cache_results() -> None:
    provider = "test-provider"
    metrics.record_upstream_call(provider, "chat", "ok", 0.2)
    metrics.record_upstream_call(provider, "chat", "timeout", 20.0)
    metrics.record_story_served(provider, degraded=True)
    metrics.record_cache("hit")
    metrics.record_dependency_error("database", "test")

    assert (
        current("story_upstream_calls_total", provider=provider, operation="chat", outcome="ok")
        == 1
    )
    assert (
        current(
            "story_upstream_call_duration_seconds_sum",
            provider=provider,
            operation="chat",
            outcome="timeout",
        )
        == 20.0
    )
    assert current("story_stories_served_total", provider=provider, degraded="true") == 1
    assert current("story_cache_requests_total", result="hit") >= 1
    assert current("story_dependency_errors_total", dependency="database", operation="test") >= 1


@pytest.mark.slow
def test_with_a_multiprocess_directory_two_workers_report_one_sum(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
    }

    def workers_counted() -> set[str]:
        return {path.stem.rsplit("_", 1)[-1] for path in directory.glob("counter_*.db")}

    sent = 0
    with app_server(env) as server:
        # A new connection each time; the kernel hands them to either worker.
        while sent < 10 or (len(workers_counted()) < 2 and sent < 200):
            httpx.get(f"{server.url}/v1/recommendations", params={"age": 6}, timeout=10)
            sent += 1
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        workers = workers_counted()

    labels = {"method": "GET", "route": "/v1/recommendations", "status": "200"}
    assert len(workers) == 2, f"only {workers} served {sent} requests"
    assert sample(text, "story_http_requests_total", **labels) == sent


@pytest.mark.slow
def test_a_restarted_server_does_not_report_the_previous_runs_counts(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet" / "prometheus"  # `python -m app` creates it
    env = {
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
    }
    labels = {"method": "GET", "route": "/v1/recommendations", "status": "200"}
    with app_server(env) as server:
        for _ in range(3):
            httpx.get(f"{server.url}/v1/recommendations", params={"age": 6}, timeout=10)
        before_restart = httpx.get(f"{server.url}/metrics", timeout=10).text
    with app_server(env) as server:
        after_restart = httpx.get(f"{server.url}/metrics", timeout=10).text

    assert sample(before_restart, "story_http_requests_total", **labels) == 3
    assert sample(after_restart, "story_http_requests_total", **labels) == 0
