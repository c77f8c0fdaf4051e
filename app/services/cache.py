"""The story cache: the third rung of the degradation ladder.

Every story an upstream writes is remembered under its normalised request
(prompt case- and space-folded, age, length, language) for `STORY_CACHE_TTL_SECONDS`.
When OpenAI and Replicate both fail, a remembered story for the same request is
served (`provider: "cache"`, `degraded: true`) before the offline storyteller.

Two tiers: an in-process LRU, always; Redis, when configured, so every replica
shares what any of them wrote. Every Redis call runs under the Redis budget.
Writes go to Redis in the background, off the response path. After a Redis
failure the cache stays local until the process's `RedisGate` reopens (1 s),
so a silent Redis costs one budget now and then, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis

from app.platform.clock import SYSTEM_CLOCK, Clock
from app.platform.redis import RedisBudget, RedisGate
from app.providers.base import GeneratedStory, StoryRequest, Usage

logger = logging.getLogger(__name__)

CACHE_PROVIDER = "cache"


def cache_key(request: StoryRequest) -> str:
    prompt = " ".join(request.prompt.casefold().split())
    raw = json.dumps([prompt, request.age, request.length, request.language.lower()])
    return hashlib.sha256(raw.encode()).hexdigest()


def _encode(story: GeneratedStory) -> str:
    return json.dumps(
        {"title": story.title, "paragraphs": list(story.paragraphs), "model": story.model},
        ensure_ascii=False,
    )


def _decode(raw: str | bytes) -> GeneratedStory:
    data = json.loads(raw)
    return GeneratedStory(
        title=str(data["title"]),
        paragraphs=tuple(str(p) for p in data["paragraphs"]),
        provider=CACHE_PROVIDER,
        model=str(data.get("model", "")),
        usage=Usage(),
    )


class StoryCache:
    """Remembers upstream stories; answers from Redis, else from this process.

    Redis is reached through a `RedisBudget` (`app.platform.redis`): each call
    within the budget, and after a failure local only until the process's
    `RedisGate` reopens.
    """

    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        ttl_seconds: float,
        redis_budget: RedisBudget,
        max_local_entries: int = 1000,
        key_prefix: str = "story:cache:",
        clock: Clock = SYSTEM_CLOCK,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._budget = redis_budget
        self._writes: set[asyncio.Task[tuple[None, bool]]] = set()
        self._ttl = ttl_seconds
        self._max_local = max_local_entries
        self._prefix = key_prefix
        self._clock = clock
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._on_result = on_result or (lambda _result: None)

    async def put(self, request: StoryRequest, story: GeneratedStory) -> None:
        key = cache_key(request)
        value = _encode(story)
        self._local[key] = (self._clock.monotonic() + self._ttl, value)
        self._local.move_to_end(key)
        while len(self._local) > self._max_local:
            self._local.popitem(last=False)
        redis = self._redis
        if redis is not None and self._budget.available:
            # Off the response path: the story is already on its way to the child.
            task = asyncio.create_task(
                self._budget.run(
                    lambda: self._write(redis, key, value), _nothing, operation="cache_write"
                )
            )
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, redis: aioredis.Redis, key: str, value: str) -> None:
        await redis.set(self._prefix + key, value, ex=max(1, int(self._ttl)))

    async def get(self, request: StoryRequest) -> GeneratedStory | None:
        key = cache_key(request)
        redis = self._redis
        if redis is not None:
            raw, _ = await self._budget.run(
                lambda: redis.get(self._prefix + key), _nothing, operation="cache_read"
            )
            if raw is not None:
                self._on_result("hit")
                return _decode(raw)
        entry = self._local.get(key)
        if entry is not None:
            expires, value = entry
            if expires > self._clock.monotonic():
                self._on_result("hit")
                return _decode(value)
            del self._local[key]
        self._on_result("miss")
        return None

    async def aclose(self) -> None:
        """Lets the background writes still running finish (each within its budget)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


async def _nothing() -> None:
    return None


class CacheRedisEvents:
    """The cache's Redis failures, as log lines (the `BudgetListener` of its budget)."""

    def __init__(self, gate: RedisGate) -> None:
        self._gate = gate

    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        logger.warning(
            "story cache: redis %s skipped; local only for %.0f s",
            operation.removeprefix("cache_"),
            self._gate.cool_down_seconds,
            extra={"error": repr(error)},
        )

    def gate_closed(self) -> None:
        pass

    def recovered(self) -> None:
        pass
