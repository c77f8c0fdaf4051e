"""How the service survives slow, failing and overloaded upstreams, framework-free.

Every guard an upstream call passes through lives in this package, one module
each: the request's `Deadline` (`deadline`), a `RetryPolicy` bounded by attempts,
the deadline and a per-upstream `RetryBudget` (`retry`), a `CircuitBreaker`
(`breaker`) whose state lives in a store (`stores`: in-process, Redis, or Redis
with an in-process fallback), a `Bulkhead` admitting calls up to a limit that
follows the upstream (`adaptive`: `GradientLimit`) with a deadline-bounded queue
(`bulkhead`), a `QuotaGovernor` spending an upstream account's requests and
tokens per minute across the fleet (`quota`), and `graceful_degradation` turning
a failure into a cheap local answer (`fallback`).
What they do is reported to a `ResilienceObserver` (`observer`); what they raise
is in `errors`. Time is an injected `app.platform.clock.Clock` and sleeping an
injected `Sleep`, so tests drive every state machine with the doubles in
`app.core.resilience.testing` (not re-exported here) and never wait. Nothing here
imports a web framework.

Recommended composition for one upstream call (retries outermost, so a sleeping
retry holds no bulkhead slot, and an open breaker or a full bulkhead ends the
retries at once because neither error is retryable)::

    async def attempt() -> Story:
        async with bulkhead:
            return await breaker.call(provider.generate, request)

    with deadline_scope(settings.request_deadline_seconds):
        story = await policy.call(attempt)
"""

from app.core.resilience.adaptive import ConcurrencyLimit, FixedLimit, GradientLimit, Sample
from app.core.resilience.breaker import (
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    BreakerStore,
    CircuitBreaker,
    Permit,
    Transition,
    default_is_failure,
)
from app.core.resilience.bulkhead import SHED_REASONS, AdmissionEvents, AdmissionPermit, Bulkhead
from app.core.resilience.deadline import Deadline, current_deadline, deadline_scope, run_within
from app.core.resilience.errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceededError,
    QuotaExhaustedError,
    ResilienceError,
)
from app.core.resilience.fallback import graceful_degradation
from app.core.resilience.observer import (
    DEFAULT_OBSERVER,
    BreakerState,
    CompositeObserver,
    LoggingObserver,
    NullObserver,
    ResilienceObserver,
    notify_observer,
)
from app.core.resilience.quota import (
    QuotaEvents,
    QuotaGovernor,
    QuotaLimits,
    RedisBuckets,
    Reservation,
)
from app.core.resilience.retry import (
    RetryBudget,
    RetryPolicy,
    Sleep,
    default_is_retryable,
    default_retry_after,
    retry_on_failure,
)
from app.platform.clock import SYSTEM_CLOCK, Clock, SystemClock

__all__ = [
    "DEFAULT_OBSERVER",
    "SHED_REASONS",
    "SYSTEM_CLOCK",
    "Admission",
    "AdmissionEvents",
    "AdmissionPermit",
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerStore",
    "Bulkhead",
    "BulkheadFullError",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "CompositeObserver",
    "ConcurrencyLimit",
    "Deadline",
    "DeadlineExceededError",
    "FixedLimit",
    "GradientLimit",
    "LoggingObserver",
    "NullObserver",
    "Permit",
    "QuotaEvents",
    "QuotaExhaustedError",
    "QuotaGovernor",
    "QuotaLimits",
    "RedisBuckets",
    "Reservation",
    "ResilienceError",
    "ResilienceObserver",
    "RetryBudget",
    "RetryPolicy",
    "Sample",
    "Sleep",
    "SystemClock",
    "Transition",
    "current_deadline",
    "deadline_scope",
    "default_is_failure",
    "default_is_retryable",
    "default_retry_after",
    "graceful_degradation",
    "notify_observer",
    "retry_on_failure",
    "run_within",
]
