"""How the time left in a request is shared out between the rungs of the ladder.

The ladder (`StoryService`) tries OpenAI, then Replicate, then the cache, then
the offline storyteller. Time is part of the contract: a hanging first upstream
must leave a healthy second one time to answer, and the last rungs and the
write to the database must still fit before the deadline. So each upstream rung
runs under a deadline of its own (`deadline_scope`, seen by every guard below):

- `reserve_seconds` of what is left are kept back for the cache, the offline
  storyteller and storing the story;
- a rung followed by another upstream rung may use at most `share` of the rest,
  and never so much that a later rung gets less than its floor;
- the last upstream rung may use all of the rest;
- a rung whose budget is below its own floor is skipped: too little time to be
  worth a paid call.

A rung is cut at its deadline even when something inside it ignores the
cancellation (`run_within`); `grace_seconds` after that deadline is the most a
rung can overrun it, the margin the service states for its deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from app.core.resilience import Deadline, deadline_scope, run_within

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LadderBudget:
    reserve_seconds: float = 0.0
    share: float = 1.0
    floors: Mapping[str, float] = field(default_factory=dict)
    grace_seconds: float = 0.25

    def __post_init__(self) -> None:
        if self.reserve_seconds < 0 or not 0 < self.share <= 1 or self.grace_seconds < 0:
            raise ValueError("reserve_seconds >= 0, 0 < share <= 1, grace_seconds >= 0")

    def floor(self, name: str) -> float:
        return self.floors.get(name, 0.0)

    def for_rung(self, names: Sequence[str], index: int, remaining: float) -> float:
        """Seconds rung `index` of the upstream rungs `names` may use, given `remaining`."""
        available = remaining - self.reserve_seconds
        if index == len(names) - 1:
            return available
        later = sum(self.floor(name) for name in names[index + 1 :])
        return min(available - later, max(self.floor(names[index]), self.share * available))

    async def run(self, seconds: float, call: Callable[[], Awaitable[T]]) -> T:
        """Await `call()` under a deadline `seconds` from now (never past the request's)."""
        with deadline_scope(seconds) as deadline:
            hard_stop = Deadline(deadline.at_monotonic + self.grace_seconds, deadline.clock)
            return await run_within(hard_stop, call)
