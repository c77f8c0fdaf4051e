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
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis

from app.core.state import RedisGate
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
    """Remembers upstream stories; answers from Redis, else from this process."""

    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        ttl_seconds: float,
        max_local_entries: int = 1000,
        redis_budget_seconds: float = 0.05,
        key_prefix: str = "story:cache:",
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[str], None] | None = None,
        gate: RedisGate | None = None,
    ) -> None:
        self._redis = redis
        # After a Redis failure, local only until the gate reopens: the process's
        # shared gate (so other Redis users skip too), or one of its own.
        self._gate = gate or RedisGate()
        self._writes: set[asyncio.Task[None]] = set()
        self._ttl = ttl_seconds
        self._max_local = max_local_entries
        self._budget = redis_budget_seconds
        self._prefix = key_prefix
        self._clock = clock
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._on_result = on_result or (lambda _result: None)

    def _redis_usable(self) -> aioredis.Redis | None:
        if self._redis is None or not self._gate.is_open():
            return None
        return self._redis

    def _redis_failed(self, action: str, error: BaseException) -> None:
        self._gate.report_failure()
        logger.warning(
            "story cache: redis %s skipped; local only for %.0f s",
            action,
            self._gate.cool_down_seconds,
            extra={"error": repr(error)},
        )

    async def put(self, request: StoryRequest, story: GeneratedStory) -> None:
        key = cache_key(request)
        value = _encode(story)
        self._local[key] = (self._clock() + self._ttl, value)
        self._local.move_to_end(key)
        while len(self._local) > self._max_local:
            self._local.popitem(last=False)
        redis = self._redis_usable()
        if redis is not None:
            task = asyncio.create_task(self._write(redis, key, value))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, redis: aioredis.Redis, key: str, value: str) -> None:
        try:
            async with asyncio.timeout(self._budget):
                await redis.set(self._prefix + key, value, ex=max(1, int(self._ttl)))
        except Exception as error:
            self._redis_failed("write", error)

    async def get(self, request: StoryRequest) -> GeneratedStory | None:
        key = cache_key(request)
        redis = self._redis_usable()
        if redis is not None:
            try:
                async with asyncio.timeout(self._budget):
                    raw = await redis.get(self._prefix + key)
                if raw is not None:
                    self._on_result("hit")
                    return _decode(raw)
            except Exception as error:
                self._redis_failed("read", error)
        entry = self._local.get(key)
        if entry is not None:
            expires, value = entry
            if expires > self._clock():
                self._on_result("hit")
                return _decode(value)
            del self._local[key]
        self._on_result("miss")
        return None

    async def aclose(self) -> None:
        """Lets the background writes still running finish (each within its budget)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
