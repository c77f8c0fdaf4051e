"""The daily story quota: how many new stories one principal may have written per UTC day.

Counted in the database (the stories themselves), not in Redis: the count is the
same on every worker and replica, survives restarts, and a repeated request
(same `Idempotency-Key`) that returns its first story creates nothing and costs
nothing. Checked before any upstream is called, so a principal over its quota
spends nothing. Concurrent requests of one principal may overshoot by as many
as are in flight at once (the count is read, not reserved): a quota against
cost abuse, not an exact meter.

Anonymous callers (development, `AUTH_MODE=none`) are one shared principal and
are not counted; the per-address rate limits hold them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from app.db.repository import StoryRepository
from app.errors import QuotaExceededError


def utc_midnight(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


class DailyQuota:
    def __init__(
        self,
        repository: StoryRepository,
        stories_per_day: int,
        *,
        exempt: frozenset[str] = frozenset(),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repository = repository
        self.stories_per_day = stories_per_day
        self.exempt = exempt
        self._now = now

    async def check(self, owner: str) -> None:
        """`QuotaExceededError` (429, `Retry-After` until midnight UTC) when spent."""
        if self.stories_per_day <= 0 or owner in self.exempt:
            return
        now = self._now()
        today = utc_midnight(now)
        used = await self.repository.count_created_since(owner, today)
        if used < self.stories_per_day:
            return
        renews = today + timedelta(days=1)
        raise QuotaExceededError(
            f"This account may create {self.stories_per_day} stories a day and has used "
            "them all; the quota renews at 00:00 UTC. Stories already written can still "
            "be read.",
            retry_after=math.ceil((renews - now).total_seconds()),
        )
