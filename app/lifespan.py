"""The one composition root: everything the app holds is built, started and closed here.

`lifespan_for(settings, version)` is the app's lifespan. At start it opens the
database and applies migrations (the embedded SQLite file now; a PostgreSQL that
does not answer is connected and migrated in the background, see `app.db.deferred`),
opens Redis when configured, builds the providers that have keys with their
breakers, the story service, the rate limiter, the maintenance switch, the
system sampler and the health service, installs the SIGTERM drain hook, and
holds all of it in one typed `AppState` at `app.state.app_state` (read through
the getters in `app.dependencies`). A part that cannot be built is an error at
start, never a silently missing feature. At stop everything is closed in
reverse order. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from fastapi import FastAPI

from app.core.ratelimit import (
    FailoverCounters,
    InProcessCounters,
    RateLimitPolicy,
    RedisCounters,
    preload_rate_limit_script,
)
from app.core.resilience import (
    CircuitBreaker,
    CompositeObserver,
    LoggingObserver,
    ResilienceObserver,
)
from app.core.resilience.overrides import BreakerOverrides, OverrideSync
from app.core.resilience.stores import preload_breaker_script
from app.core.security import Authenticator, build_authenticator
from app.db.api_keys import open_api_key_store
from app.db.deferred import DeferredRepository
from app.db.postgres import PostgresStoryRepository
from app.db.repository import StoryRepository
from app.db.sqlite import SqliteStoryRepository
from app.platform.background import every, stop_task
from app.platform.config import Settings
from app.platform.logs import configure_logging
from app.platform.loop_lag import LoopLag
from app.platform.maintenance import MaintenanceSwitch
from app.platform.metrics import (
    PrometheusObserver,
    mark_process_dead,
    record_cache,
    record_loop_lag,
    record_moderation,
    record_upstream_call,
    refresh_breaker_states,
    set_build_info,
)
from app.platform.objects import ObjectStore
from app.platform.redis import RedisBudget, RedisGate, open_redis
from app.platform.sentry import init_sentry, shutdown_sentry
from app.platform.shutdown import DrainOnSignal, Lifecycle
from app.platform.system import SystemMonitor
from app.providers.offline import OfflineStoryProvider
from app.providers.picture_registry import build_picture_parts
from app.providers.registry import Upstreams, build_upstreams
from app.services.cache import CacheRedisEvents, StoryCache
from app.services.health import HealthService
from app.services.idempotency import IdempotencyPolicy
from app.services.illustrations import IllustrationService
from app.services.ladder import LadderBudget
from app.services.moderation import ModerationService
from app.services.quota import DailyQuota
from app.services.stories import StoryService

logger = logging.getLogger(__name__)

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


@dataclass
class AppState:
    """Everything one app instance holds while it runs."""

    settings: Settings
    repository: StoryRepository
    redis: aioredis.Redis | None
    redis_gate: RedisGate
    stories: StoryService
    breakers: dict[str, CircuitBreaker]
    identity: Authenticator
    rate_limits: RateLimitPolicy
    rate_counters: FailoverCounters
    maintenance: MaintenanceSwitch
    system: SystemMonitor
    health: HealthService
    lifecycle: Lifecycle = field(default_factory=Lifecycle)


async def open_repository(settings: Settings) -> StoryRepository:
    """The store itself, connected now (not migrated); raises when it cannot be opened."""
    db = settings.database
    if db.url is not None:
        return await PostgresStoryRepository.connect(
            db.url.get_secret_value(),
            min_size=db.pool_min_size,
            max_size=db.pool_max_size,
            command_timeout=db.command_timeout_seconds,
            connect_timeout=db.connect_timeout_seconds,
        )
    return await SqliteStoryRepository.open(db.sqlite_path)


async def start_repository(settings: Settings) -> StoryRepository:
    """The repository the service runs on, migrated when it answers.

    PostgreSQL (a server that may be down for a while): a `DeferredRepository`
    that tries once now and, failing that, keeps trying in the background, so
    the process starts, stays live and becomes ready once the database answers.
    SQLite (a file of this container): opened and migrated now; a file that
    cannot be opened is fatal, with a message that names it.
    """
    db = settings.database
    if db.url is not None:
        url = db.url.get_secret_value()
        password = urlsplit(url).password or ""
        deferred = DeferredRepository(
            "postgres",
            lambda: open_repository(settings),
            secrets=[url, password, unquote(password)],
        )
        await deferred.start()
        return deferred
    try:
        repository = await open_repository(settings)
    except Exception as error:
        raise RuntimeError(
            f"cannot open the SQLite database at {db.sqlite_path} (DATABASE_SQLITE_PATH): {error!r}"
        ) from error
    try:
        applied = await repository.migrate()
    except BaseException:
        await repository.close()
        raise
    if applied:
        logger.info("migrations applied", extra={"versions": applied})
    return repository


def redis_from_settings(
    settings: Settings,
    *,
    timeout_seconds: float | None = None,
    max_connections: int | None = None,
) -> aioredis.Redis | None:
    """The Redis client, or None when REDIS_URL is unset.

    By default the request path's client: the Redis budget as its socket timeout.
    Health checks open their own small client with the (longer) health-check
    timeout, so a Redis that is slower than the request budget but answering
    does not make every replica unready at once.
    """
    cfg = settings.redis
    if cfg.url is None:
        return None
    return open_redis(
        cfg.url.get_secret_value(),
        timeout_seconds=timeout_seconds or cfg.socket_timeout_ms / 1000,
        connect_timeout_seconds=cfg.connect_timeout_ms / 1000,
        max_connections=max_connections or cfg.max_connections,
        # The request path's budget judges Redis net of event-loop lag; the
        # client's own timeouts are only a backstop above it (app.platform.redis).
        lag_allowance_seconds=0.0 if timeout_seconds else cfg.loop_lag_allowance_ms / 1000,
    )


async def warm_redis(redis: aioredis.Redis, *, connections: int) -> None:
    """Opens pooled connections and loads the Lua scripts before the first request.

    Otherwise the first burst after a start pays connection set-up and script
    loading inside the 50 ms Redis budget, times out, and runs on in-process
    state (breakers then not shared) for a second. A Redis that does not answer
    is not fatal here: readiness reports it.
    """
    try:
        async with asyncio.timeout(2.0):
            await asyncio.gather(*(redis.ping() for _ in range(connections)))
            await preload_breaker_script(redis)
            await preload_rate_limit_script(redis)
    except Exception as error:
        logger.warning("redis did not answer at start", extra={"error": repr(error)})


async def _purge_expired_keys(repository: StoryRepository) -> None:
    """Deletes expired Idempotency-Keys (run hourly by `every`)."""
    purged = await repository.purge_expired_keys(datetime.now(UTC))
    if purged:
        logger.info("expired idempotency keys purged", extra={"count": purged})


async def build_state(settings: Settings, version: str, stack: AsyncExitStack) -> AppState:
    """Builds and starts every part; `stack` closes them, in reverse order."""
    repository = await start_repository(settings)
    stack.push_async_callback(repository.close)

    redis = redis_from_settings(settings)
    # The check runner's budget ends a check's wait and says so ("no answer
    # within 2 s"); the client's own timeouts sit above it, so the two never race
    # and only bound how long an abandoned check lingers.
    health_redis = redis_from_settings(
        settings, timeout_seconds=2 * settings.health.check_timeout_seconds, max_connections=2
    )
    if health_redis is not None:
        stack.push_async_callback(health_redis.aclose)
    if redis is not None:
        stack.push_async_callback(redis.aclose)
        await warm_redis(redis, connections=min(8, settings.redis.max_connections))
    # One view per process of whether Redis answers, shared by all its users.
    redis_gate = RedisGate(lag_allowance_seconds=settings.redis.loop_lag_allowance_ms / 1000)
    redis_budget_seconds = settings.redis.socket_timeout_ms / 1000

    # Every breaker transition, retry, rejection and fallback: logged and counted.
    observer: ResilienceObserver = CompositeObserver(LoggingObserver(), PrometheusObserver())
    overrides = BreakerOverrides()
    if redis is not None:  # operators' force open / closed, read every second
        syncing = asyncio.create_task(
            every(1.0, OverrideSync(redis, overrides), what="breaker override sync", at_once=True),
            name="breaker-overrides",
        )
        stack.push_async_callback(stop_task, syncing)
    loop_lag = LoopLag(report=record_loop_lag)  # our saturation: not the upstreams' latency
    loop_lag.start()
    stack.push_async_callback(loop_lag.stop)
    upstreams = await build_upstreams(
        settings,
        redis,
        stack,
        observer=observer,
        record_call=record_upstream_call,
        redis_gate=redis_gate,
        overrides=overrides,
        loop_lag=loop_lag.seconds,
    )
    cache = StoryCache(
        redis,
        ttl_seconds=settings.story_cache_ttl_seconds,
        # No retry timer of its own: local only until the gate reopens.
        redis_budget=RedisBudget(
            budget_seconds=redis_budget_seconds,
            retry_seconds=0.0,
            gate=redis_gate,
            listener=CacheRedisEvents(redis_gate),
        ),
        on_result=record_cache,
    )
    stack.push_async_callback(cache.aclose)
    illustrations = await _start_illustrations(settings, repository, upstreams, stack, observer)
    stories = StoryService(
        repository,
        upstreams.story_providers,
        offline=OfflineStoryProvider() if settings.resilience.offline_fallback else None,
        illustrations=illustrations,
        deadline_seconds=settings.request_deadline_seconds,
        budget=LadderBudget(
            reserve_seconds=settings.resilience.ladder_reserve_seconds,
            share=settings.resilience.rung_share,
            floors={
                "openai": settings.openai.floor_seconds,
                "replicate": settings.replicate.floor_seconds,
            },
        ),
        cache=cache,
        quota=DailyQuota(
            repository,
            settings.story_daily_quota,
            exempt=frozenset({settings.anonymous_principal}),
        ),
        # Every prompt and upstream story checked (docs/security.md, "Child-safe content").
        moderation=ModerationService.from_settings(
            settings, upstreams.moderator, record=record_moderation
        ),
        idempotency=IdempotencyPolicy(
            lease_seconds=settings.idempotency_lease_seconds,
            ttl_seconds=settings.idempotency_ttl_seconds,
            wait_seconds=settings.idempotency_wait_seconds,
        ),
    )
    purger = asyncio.create_task(
        every(
            3600,
            lambda: _purge_expired_keys(repository),
            what="idempotency key purge",
            at_once=True,
        ),
        name="purge-keys",
    )
    stack.push_async_callback(stop_task, purger)

    # Operations: error reporting, rate limits, maintenance, system figures, drain.
    if init_sentry(settings, version):
        stack.callback(shutdown_sentry)
    set_build_info(version)
    stack.callback(mark_process_dead)
    rate_counters = FailoverCounters(
        RedisCounters(redis) if redis is not None else None,
        InProcessCounters(),
        budget_seconds=settings.rate_limit.redis_budget_ms / 1000,
        retry_seconds=settings.rate_limit.redis_retry_seconds,
        gate=redis_gate,
    )
    system = SystemMonitor(
        interval_seconds=settings.health.sample_interval_seconds,
        disk_path=settings.health.disk_path,
    )
    await system.start()
    stack.push_async_callback(system.stop)
    # Who the caller is: bearer JWTs (keys fetched now when from a JWKS), or nobody.
    # API keys (server-to-server) first, through their own small pool.
    api_keys = open_api_key_store(settings) if settings.auth.api_keys else None
    identity = build_authenticator(settings, observer=observer, api_keys=api_keys)
    stack.push_async_callback(identity.aclose)
    await identity.start()
    breakers = {**upstreams.breakers, **identity.breakers, **illustrations.breakers}
    # Breaker state gauges from the shared store, in the background: a scrape reads memory.
    breaker_states = asyncio.create_task(
        every(
            settings.metrics_breaker_refresh_seconds,
            lambda: refresh_breaker_states(breakers),
            what="breaker state refresh",
            at_once=True,
        ),
        name="breaker-states",
    )
    stack.push_async_callback(stop_task, breaker_states)
    maintenance = MaintenanceSwitch(settings.maintenance)
    await maintenance.start(redis)
    stack.push_async_callback(maintenance.stop)
    lifecycle = Lifecycle()
    _install_drain(lifecycle, settings, stack)

    return AppState(
        settings=settings,
        repository=repository,
        redis=redis,
        redis_gate=redis_gate,
        stories=stories,
        breakers=breakers,
        identity=identity,
        rate_limits=RateLimitPolicy(settings.rate_limit, rate_counters),
        rate_counters=rate_counters,
        maintenance=maintenance,
        system=system,
        health=HealthService(
            settings,
            version=version,
            repository=repository,
            redis=health_redis,
            breakers=breakers,
            rate_counters=rate_counters,
            maintenance=maintenance,
            system=system,
            lifecycle=lifecycle,
        ),
        lifecycle=lifecycle,
    )


async def _start_illustrations(
    settings: Settings,
    repository: StoryRepository,
    upstreams: Upstreams,
    stack: AsyncExitStack,
    observer: ResilienceObserver,
) -> IllustrationService:
    """Pictures: the object store, the fetcher and image check, and the sweep that
    resumes pending pictures (at start, then every ILLUSTRATION_SWEEP_SECONDS)."""
    parts = await build_picture_parts(
        settings, upstreams, stack, observer=observer, record_call=record_upstream_call
    )
    service = IllustrationService(
        repository,
        ObjectStore.from_settings(settings.object_store),
        illustrator=upstreams.illustrator,
        fetcher=parts.fetcher,
        moderator=parts.moderator,
        settings=settings.illustrations,
        objects=settings.object_store,
        breakers=parts.breakers,
    )
    stack.push_async_callback(service.drain)
    sweeper = asyncio.create_task(
        every(
            settings.illustrations.sweep_seconds,
            service.sweep,
            what="illustration sweep",
            at_once=True,
        ),
        name="illustration-sweep",
    )
    stack.push_async_callback(stop_task, sweeper)
    return service


def _install_drain(lifecycle: Lifecycle, settings: Settings, stack: AsyncExitStack) -> None:
    """On SIGTERM/SIGINT: readiness fails at once, then the server's shutdown runs."""
    loop = asyncio.get_running_loop()

    def drain() -> None:
        if not lifecycle.draining:
            lifecycle.draining = True
            # Logging takes locks: not from inside a signal handler.
            loop.call_soon_threadsafe(
                logger.warning, "shutdown signal received: draining; readiness fails"
            )

    hook = DrainOnSignal(drain, delay_seconds=settings.shutdown.drain_delay_seconds)
    if hook.install():
        stack.callback(hook.uninstall)


def lifespan_for(settings: Settings, version: str) -> Lifespan:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        async with AsyncExitStack() as stack:
            state = await build_state(settings, version, stack)
            app.state.app_state = state
            logger.info(
                "service started",
                extra={
                    "database": state.repository.backend,
                    "redis": state.redis is not None,
                    "providers": state.stories.provider_names,
                },
            )
            yield
            state.lifecycle.draining = True
            logger.info("service stopping")

    return lifespan
