"""The errors the resilience layer raises itself, as opposed to upstream errors.

Each carries the two flags the other guards read (`retryable`, `counts_as_failure`)
so that retries and breakers treat them uniformly with upstream errors::

    ResilienceError                  root; retryable=False, counts_as_failure=False
     +-- CircuitOpenError            the breaker refused the call (retry_after: seconds)
     +-- BulkheadFullError           no concurrency slot within the wait (retry_after, reason)
     +-- QuotaExhaustedError         the upstream account's quota is spent for longer than
                                     the caller may wait (retry_after, reason)
     +-- DeadlineExceededError       the request's deadline ran out

None of them counts against a circuit breaker: the upstream never answered. An
exhausted retry budget raises nothing new: the last upstream error is re-raised.
"""

from __future__ import annotations

__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
    "DeadlineExceededError",
    "QuotaExhaustedError",
    "ResilienceError",
]


class ResilienceError(Exception):
    """Root of the errors raised by the resilience layer itself."""

    retryable: bool = False
    counts_as_failure: bool = False
    retry_after: float | None = None


class CircuitOpenError(ResilienceError):
    retry_after: float

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_after:.1f} s")
        self.name = name
        self.retry_after = retry_after


class BulkheadFullError(ResilienceError):
    retry_after: float

    def __init__(self, name: str, retry_after: float = 1.0, *, reason: str = "full") -> None:
        super().__init__(f"bulkhead {name!r} is full ({reason}); retry in {retry_after:.1f} s")
        self.name = name
        self.retry_after = retry_after
        self.reason = reason


class QuotaExhaustedError(ResilienceError):
    retry_after: float

    def __init__(self, name: str, retry_after: float, *, reason: str) -> None:
        super().__init__(
            f"quota of {name!r} spent ({reason}); next call possible in {retry_after:.1f} s"
        )
        self.name = name
        self.retry_after = retry_after
        self.reason = reason


class DeadlineExceededError(ResilienceError):
    def __init__(self, message: str = "the request's deadline was exceeded") -> None:
        super().__init__(message)
