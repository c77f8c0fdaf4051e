"""Where circuit-breaker state lives: in this process, in Redis, or in Redis with a fallback.

Every store implements `app.core.resilience.breaker.BreakerStore`: one atomic step
of the state machine per call. The app uses `InMemoryBreakerStore` without Redis,
else `FailoverBreakerStore` over `RedisBreakerStore`, so that every worker shares
one breaker per upstream and none fails a request because Redis did.
"""

from app.core.resilience.stores.failover import FailoverBreakerStore
from app.core.resilience.stores.memory import InMemoryBreakerStore
from app.core.resilience.stores.redis import RedisBreakerStore, preload_breaker_script

__all__ = [
    "FailoverBreakerStore",
    "InMemoryBreakerStore",
    "RedisBreakerStore",
    "preload_breaker_script",
]
