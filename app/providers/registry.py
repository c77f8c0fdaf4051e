"""Builds the providers that have keys, each wrapped in its resilience guard.

One breaker and one bulkhead per upstream operation (`openai:chat`,
`openai:moderation`, `replicate:text`, `replicate:image`): each bulkhead's limit
follows its own operation's latency (a moderation check and a story differ by
tens of times), between `RESILIENCE_CONCURRENCY_MIN` and the provider's ceiling
(`OPENAI_MAX_CONCURRENCY`, `REPLICATE_MAX_CONCURRENCY`). One retry budget shared
by all. One quota governor per provider account when its quota is set
(`OPENAI_REQUESTS_PER_MINUTE`, `OPENAI_TOKENS_PER_MINUTE`,
`REPLICATE_REQUESTS_PER_MINUTE`), for story and image calls (OpenAI's moderation
endpoint is free and limited apart). Breaker state and quotas live in Redis when
it is configured (with an in-process fallback within the Redis budget),
in-process otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from app.core.resilience import (
    BreakerStore,
    Bulkhead,
    CircuitBreaker,
    GradientLimit,
    QuotaGovernor,
    QuotaLimits,
    RedisBuckets,
    ResilienceObserver,
    RetryBudget,
    RetryPolicy,
)
from app.core.resilience.overrides import BreakerOverrides, OverridingBreakerStore
from app.core.resilience.stores import (
    FailoverBreakerStore,
    InMemoryBreakerStore,
    RedisBreakerStore,
)
from app.platform import metrics
from app.platform.config import BREAKER_NAMES, Settings
from app.platform.redis import RedisGate
from app.providers.base import ContentModerator, IllustrationProvider, StoryProvider
from app.providers.moderation import OpenAIModerator, ResilientModerator
from app.providers.openai import OpenAIStoryProvider
from app.providers.replicate import (
    ReplicateIllustrator,
    ReplicatePredictions,
    ReplicateStoryProvider,
    build_client,
)
from app.providers.resilient import (
    Guard,
    ResilientIllustrator,
    ResilientStoryProvider,
    UpstreamCallRecorder,
    ignore_call,
)


@dataclass
class Upstreams:
    story_providers: list[StoryProvider]
    illustrator: IllustrationProvider | None
    breakers: dict[str, CircuitBreaker]
    breaker_store: BreakerStore
    bulkheads: dict[str, Bulkhead] = field(default_factory=dict)
    quotas: dict[str, QuotaGovernor] = field(default_factory=dict)
    # OpenAI's moderation endpoint behind its guard; None without a key or in local mode.
    moderator: ContentModerator | None = None


class AdmissionRecorder:
    """An `AdmissionEvents`: the admission gauges and shed counter."""

    def shed(self, name: str, reason: str) -> None:
        metrics.ADMISSION_SHED.labels(name, reason).inc()

    def changed(self, name: str, limit: int, in_flight: int, queued: int) -> None:
        metrics.ADMISSION_LIMIT.labels(name).set(limit)
        metrics.ADMISSION_IN_FLIGHT.labels(name).set(in_flight)
        metrics.ADMISSION_QUEUED.labels(name).set(queued)


class QuotaRecorder:
    """A `QuotaEvents`: waits, refusals and the storage of the quotas."""

    def waited(self, name: str, seconds: float) -> None:
        metrics.QUOTA_WAITS.labels(name).inc()

    def refused(self, name: str, reason: str) -> None:
        metrics.QUOTA_REFUSALS.labels(name, reason).inc()

    def storage(self, name: str, degraded: bool, redis_error: bool) -> None:
        if degraded and redis_error:
            metrics.record_dependency_error("redis", "quota")
        metrics.QUOTA_STORAGE_DEGRADED.labels(name).set(1 if degraded else 0)


def build_bulkhead(
    settings: Settings,
    name: str,
    ceiling: int,
    observer: ResilienceObserver,
    loop_lag: Callable[[], float] | None = None,
) -> Bulkhead:
    """The admission of one upstream operation: an adaptive limit under `ceiling`
    (holding its latency verdict while `loop_lag` explains the latency), a queue of
    `RESILIENCE_QUEUE_MAX` in which callers wait as their deadline allows."""
    res = settings.resilience
    floor = min(res.concurrency_min, ceiling)
    limit = GradientLimit(
        initial=min(max(res.concurrency_initial, floor), ceiling),
        min_limit=floor,
        max_limit=ceiling,
        tolerance=res.concurrency_latency_tolerance,
        lag=loop_lag,
    )
    return Bulkhead(
        name,
        limit,
        max_wait_seconds=None,
        max_queue=res.queue_max,
        observer=observer,
        events=AdmissionRecorder(),
    )


def quota_for(
    settings: Settings,
    provider: str,
    limits: QuotaLimits,
    redis: aioredis.Redis | None,
    gate: RedisGate | None,
) -> QuotaGovernor | None:
    """The governor of one provider account; None when no quota is set."""
    if not limits.any:
        return None
    return QuotaGovernor(
        provider,
        limits,
        redis=RedisBuckets(redis) if redis is not None else None,
        budget_seconds=settings.redis.socket_timeout_ms / 1000,
        gate=gate,
        local_share=settings.resilience.quota_local_share,
        events=QuotaRecorder(),
    )


def breaker_store_for(
    settings: Settings,
    redis: aioredis.Redis | None,
    observer: ResilienceObserver,
    gate: RedisGate | None = None,
) -> BreakerStore:
    if redis is None:
        return InMemoryBreakerStore()
    return FailoverBreakerStore(
        RedisBreakerStore(redis),
        budget_seconds=settings.redis.socket_timeout_ms / 1000,
        observer=observer,
        gate=gate,
    )


async def build_upstreams(
    settings: Settings,
    redis: aioredis.Redis | None,
    stack: AsyncExitStack,
    *,
    observer: ResilienceObserver,
    record_call: UpstreamCallRecorder = ignore_call,
    redis_gate: RedisGate | None = None,
    overrides: BreakerOverrides | None = None,
    loop_lag: Callable[[], float] | None = None,
) -> Upstreams:
    res = settings.resilience
    store = breaker_store_for(settings, redis, observer, redis_gate)
    if overrides is not None:  # an operator's force open / closed (python -m app.breakers)
        store = OverridingBreakerStore(store, overrides)
    breakers = {
        name: CircuitBreaker(
            name,
            store,
            failure_threshold=int(cfg["failure_threshold"]),
            recovery_timeout=cfg["recovery_timeout"],
            half_open_max_calls=int(cfg["half_open_max_calls"]),
            max_recovery_timeout=cfg["max_recovery_timeout"],
            observer=observer,
        )
        for name in BREAKER_NAMES
        for cfg in [res.breaker(name)]
    }
    ceilings = {
        "openai": settings.openai.max_concurrency,
        "replicate": settings.replicate.max_concurrency,
    }
    bulkheads = {
        name: build_bulkhead(settings, name, ceilings[name.split(":")[0]], observer, loop_lag)
        for name in BREAKER_NAMES
    }
    oa, rp = settings.openai, settings.replicate
    quotas = {
        "openai": quota_for(
            settings,
            "openai",
            QuotaLimits(oa.requests_per_minute, oa.tokens_per_minute),
            redis,
            redis_gate,
        ),
        "replicate": quota_for(
            settings, "replicate", QuotaLimits(rp.requests_per_minute), redis, redis_gate
        ),
    }
    policy = RetryPolicy(
        max_retries=res.retry_max_retries,
        base_delay=res.retry_base_delay_seconds,
        max_delay=res.retry_max_delay_seconds,
        retry_after_ceiling=res.retry_after_ceiling_seconds,
        budget=RetryBudget(ratio=res.retry_budget_ratio),
        observer=observer,
    )

    def guard(provider: str, operation: str, floor_seconds: float = 0.0) -> Guard:
        name = f"{provider}:{operation}"
        return Guard(
            provider=provider,
            operation=operation,
            breaker=breakers[name],
            bulkhead=bulkheads[name],
            policy=policy,
            record=record_call,
            floor_seconds=floor_seconds,
            quota=None if operation == "moderation" else quotas[provider],
        )

    story_providers: list[StoryProvider] = []
    illustrator: IllustrationProvider | None = None
    moderator: ContentModerator | None = None
    if settings.openai.configured and settings.moderation.mode == "openai":
        remote = OpenAIModerator.from_settings(settings.openai, settings.moderation.model)
        stack.push_async_callback(remote.close)
        moderator = ResilientModerator(
            remote, guard("openai", "moderation", settings.moderation.floor_seconds)
        )
    if settings.openai.configured:
        openai_provider = OpenAIStoryProvider.from_settings(settings.openai)
        stack.push_async_callback(openai_provider.close)
        story_providers.append(
            ResilientStoryProvider(
                openai_provider, guard("openai", "chat", settings.openai.floor_seconds)
            )
        )
    if settings.replicate.configured:
        rs = settings.replicate
        client, transport = build_client(rs)
        stack.push_async_callback(transport.aclose)

        def predictions(model: str) -> ReplicatePredictions:
            return ReplicatePredictions(
                client,
                model,
                poll_interval=rs.poll_interval_seconds,
                create_timeout=rs.read_timeout_seconds,
                prediction_timeout=rs.prediction_timeout_seconds,
            )

        story_providers.append(
            ResilientStoryProvider(
                ReplicateStoryProvider(predictions(rs.text_model)),
                guard("replicate", "text", rs.floor_seconds),
            )
        )
        illustrator = ResilientIllustrator(
            ReplicateIllustrator(predictions(rs.image_model)), guard("replicate", "image")
        )
    return Upstreams(
        story_providers=story_providers,
        illustrator=illustrator,
        breakers=breakers,
        breaker_store=store,
        bulkheads=bulkheads,
        quotas={name: quota for name, quota in quotas.items() if quota is not None},
        moderator=moderator,
    )
