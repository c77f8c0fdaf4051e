"""What the service opens at start and closes at stop, held in one typed `AppState`.

Nothing connects at import time: `lifespan()` opens the database (PostgreSQL
pool, or the embedded SQLite file), applies migrations, opens Redis when
configured, builds the providers that have keys, and closes all of it, in
reverse order, at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.core.background import stop_task
from app.core.config import Settings
from app.core.metrics import PrometheusObserver, record_cache, record_upstream_call
from app.core.observability import configure_logging
from app.core.resilience import (
    CircuitBreaker,
    CompositeObserver,
    LoggingObserver,
    ResilienceObserver,
)
from app.core.security import preload_rate_limit_script
from app.core.state import BreakerStore, RedisGate, preload_breaker_script
from app.db.repository import PostgresStoryRepository, SqliteStoryRepository, StoryRepository
from app.providers.offline import OfflineStoryProvider
from app.providers.registry import build_upstreams
from app.services.cache import StoryCache
from app.services.stories import IdempotencyPolicy, StoryService

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    repository: StoryRepository
    redis: aioredis.Redis | None
    stories: StoryService
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    breaker_store: BreakerStore | None = None
    redis_gate: RedisGate | None = None
    # Its own client: the health-check timeout, not the request path's budget.
    health_redis: aioredis.Redis | None = None
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False


async def open_repository(settings: Settings) -> StoryRepository:
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


def open_redis(
    settings: Settings,
    *,
    socket_timeout_seconds: float | None = None,
    max_connections: int | None = None,
) -> aioredis.Redis | None:
    """The Redis client, or None when REDIS_URL is unset.

    By default the request path's client: the Redis budget as its socket timeout.
    Health checks open their own small client with the (longer) health-check
    timeout, so a Redis that is slower than the request budget but answering
    does not make every replica unready at once.
    """
    if settings.redis.url is None:
        return None
    cfg = settings.redis
    timeout = socket_timeout_seconds or cfg.socket_timeout_ms / 1000
    # Millisecond budgets: a silent Redis must cost a request milliseconds, never
    # redis-py's default seconds. One immediate retry on a *connection* error only:
    # after a Redis restart the pooled sockets are dead, and the first use of each
    # should reconnect rather than fail over; timeouts are never retried.
    # A blocking pool: past REDIS_MAX_CONNECTIONS a caller waits (within the same
    # budget) for a free connection instead of failing at once and failing over.
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url.get_secret_value() if cfg.url else "",
        socket_timeout=timeout,
        socket_connect_timeout=max(cfg.connect_timeout_ms / 1000, timeout),
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        max_connections=max_connections or cfg.max_connections,
        timeout=timeout,
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)


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


async def _purge_expired_keys(repository: StoryRepository, every_seconds: float = 3600) -> None:
    """Deletes expired Idempotency-Keys now and then; a failure waits for the next round."""
    while True:
        try:
            purged = await repository.purge_expired_keys(datetime.now(UTC))
            if purged:
                logger.info("expired idempotency keys purged", extra={"count": purged})
        except Exception as error:
            logger.warning("idempotency key purge failed", extra={"error": repr(error)})
        await asyncio.sleep(every_seconds)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    settings: Settings = app.state.settings
    configure_logging(settings.log_level)
    async with AsyncExitStack() as stack:
        repository = await open_repository(settings)
        stack.push_async_callback(repository.close)
        applied = await repository.migrate()
        if applied:
            logger.info("migrations applied", extra={"versions": applied})

        redis = open_redis(settings)
        health_redis = open_redis(
            settings,
            socket_timeout_seconds=settings.health.check_timeout_seconds,
            max_connections=2,
        )
        if health_redis is not None:
            stack.push_async_callback(health_redis.aclose)
        if redis is not None:
            stack.push_async_callback(redis.aclose)
            await warm_redis(redis, connections=min(8, settings.redis.max_connections))

        # Every breaker transition, retry, rejection and fallback: logged and counted.
        observer: ResilienceObserver = CompositeObserver(LoggingObserver(), PrometheusObserver())
        # One view per process of whether Redis answers, shared by all its users.
        redis_gate = RedisGate()
        upstreams = await build_upstreams(
            settings,
            redis,
            stack,
            observer=observer,
            record_call=record_upstream_call,
            redis_gate=redis_gate,
        )

        cache = StoryCache(
            redis,
            ttl_seconds=settings.story_cache_ttl_seconds,
            redis_budget_seconds=settings.redis.socket_timeout_ms / 1000,
            on_result=record_cache,
            gate=redis_gate,
        )
        stack.push_async_callback(cache.aclose)
        stories = StoryService(
            repository,
            upstreams.story_providers,
            offline=OfflineStoryProvider() if settings.resilience.offline_fallback else None,
            illustrator=upstreams.illustrator,
            deadline_seconds=settings.request_deadline_seconds,
            cache=cache,
            idempotency=IdempotencyPolicy(
                lock_seconds=settings.request_deadline_seconds + 30,
                ttl_seconds=settings.idempotency_ttl_seconds,
                wait_seconds=settings.idempotency_wait_seconds,
            ),
        )
        purger = asyncio.create_task(_purge_expired_keys(repository), name="purge-keys")
        stack.push_async_callback(stop_task, purger)
        state = AppState(
            settings=settings,
            repository=repository,
            redis=redis,
            stories=stories,
            breakers=upstreams.breakers,
            breaker_store=upstreams.breaker_store,
            redis_gate=redis_gate,
            health_redis=health_redis,
        )
        app.state.app_state = state
        # Operations (app.core.operations): rate-limit counters, maintenance flag, system
        # sampler, Sentry, SIGTERM drain hook. Stopped first at shutdown.
        operations = getattr(app.state, "operations", None)
        if operations is not None:
            await operations.start(state)
            stack.push_async_callback(operations.stop)
        logger.info(
            "service started",
            extra={
                "database": repository.backend,
                "redis": redis is not None,
                "providers": stories.provider_names,
            },
        )
        yield {"app_state": state}
        state.draining = True
        logger.info("service stopping")
