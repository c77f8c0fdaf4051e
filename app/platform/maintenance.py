"""Maintenance mode's switch: API routes answer 503 with `Retry-After`
(`app.http.maintenance`); health and metrics stay up.

Two switches, either turns it on:

- `MAINTENANCE_MODE=true` for the processes started with it;
- the Redis flag `MAINTENANCE_REDIS_KEY` (default `story:maintenance`) for every
  worker and replica at once: `redis-cli SET story:maintenance on` (add `EX 3600`
  to have it end by itself), `redis-cli DEL story:maintenance` to end it. Any
  value but `0`, `off` or `false` means on.

Each process re-reads the flag in the background every `MAINTENANCE_REFRESH_SECONDS`,
so a request pays nothing for it. While Redis does not answer, the last value read
stands (an outage of Redis neither starts nor ends maintenance).
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from app.platform.background import every, stop_task
from app.platform.config import MaintenanceSettings
from app.platform.metrics import record_dependency_error, record_maintenance

logger = logging.getLogger(__name__)

_OFF_VALUES = frozenset({"", "0", "off", "false", "no"})
# The longest a flag read may take; Redis's own socket timeout is usually far shorter.
_READ_TIMEOUT_SECONDS = 1.0


class MaintenanceSwitch:
    """Whether maintenance mode is on: the setting, or the shared Redis flag."""

    def __init__(self, settings: MaintenanceSettings) -> None:
        self.forced = settings.mode
        self.redis_key = settings.redis_key
        self.refresh_seconds = settings.refresh_seconds
        self.retry_after_seconds = settings.retry_after_seconds
        self._flag = False
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        record_maintenance(self.on)

    @property
    def on(self) -> bool:
        return self.forced or self._flag

    @property
    def source(self) -> str | None:
        """What turned it on: "setting", "redis", or None when off."""
        if self.forced:
            return "setting"
        return "redis" if self._flag else None

    async def refresh(self) -> None:
        """Read the Redis flag once; on failure keep the last value."""
        if self._redis is None:
            return
        try:
            async with asyncio.timeout(_READ_TIMEOUT_SECONDS):
                raw = await self._redis.get(self.redis_key)
        except Exception as error:
            record_dependency_error("redis", "maintenance_flag")
            if not self._failing:
                self._failing = True
                logger.warning("maintenance flag unreadable", extra={"error": repr(error)})
            return
        self._failing = False
        value = raw.decode() if isinstance(raw, bytes) else (raw or "")
        flag = value.strip().lower() not in _OFF_VALUES
        if flag != self._flag:
            logger.warning("maintenance mode %s by the Redis flag", "on" if flag else "off")
        self._flag = flag
        record_maintenance(self.on)

    async def start(self, redis: Redis | None) -> None:
        """Read the flag now (so the first request obeys it), then every few seconds."""
        self._redis = redis
        if redis is None:
            return
        await self.refresh()
        self._task = asyncio.create_task(
            every(self.refresh_seconds, self.refresh, what="maintenance flag read"),
            name="maintenance-flag",
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
