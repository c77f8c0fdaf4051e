"""Builds the providers that have keys, each wrapped in its resilience guard.

One breaker per upstream operation (`openai:chat`, `openai:moderation`,
`replicate:text`, `replicate:image`), one bulkhead per upstream (`openai`,
`replicate`), one retry budget shared by all. OpenAI's moderation endpoint (the
content check, `MODERATION_MODE=openai`) shares OpenAI's bulkhead and retry
policy and has a breaker of its own. Breaker state lives in Redis when it is configured (with
an in-process fallback within the Redis budget), in-process otherwise.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

import redis.asyncio as aioredis

from app.core.resilience import (
    BreakerStore,
    Bulkhead,
    CircuitBreaker,
    ResilienceObserver,
    RetryBudget,
    RetryPolicy,
)
from app.core.resilience.stores import (
    FailoverBreakerStore,
    InMemoryBreakerStore,
    RedisBreakerStore,
)
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
    # OpenAI's moderation endpoint behind its guard; None without a key or in local mode.
    moderator: ContentModerator | None = None


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
) -> Upstreams:
    res = settings.resilience
    store = breaker_store_for(settings, redis, observer, redis_gate)
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
    bulkheads = {
        name: Bulkhead(
            name,
            res.bulkhead_max_concurrent,
            res.bulkhead_max_wait_seconds,
            observer=observer,
        )
        for name in ("openai", "replicate")
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
        return Guard(
            provider=provider,
            operation=operation,
            breaker=breakers[f"{provider}:{operation}"],
            bulkhead=bulkheads[provider],
            policy=policy,
            record=record_call,
            floor_seconds=floor_seconds,
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
        moderator=moderator,
    )
