"""Graceful degradation: answer with something cheap rather than fail.

For calls whose result is a nicety (recommendations, illustrations), an upstream
failure should cost the feature, not the request. `graceful_degradation` turns
the chosen errors into a fallback value, reports each to the observer so that a
silent degradation still shows in logs and metrics, and lets cancellations
through, so a client that went away is never answered with a fallback.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, overload

from app.core.resilience.observer import (
    DEFAULT_OBSERVER,
    ResilienceObserver,
    name_of,
    notify_observer,
)

__all__ = ["graceful_degradation"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class _Degrade(Generic[R]):
    def __init__(
        self,
        fallback_value: R | Callable[[], R],
        exceptions: tuple[type[BaseException], ...],
        on_fallback: Callable[[BaseException], None] | None,
        name: str | None,
        observer: ResilienceObserver,
    ) -> None:
        self._fallback_value = fallback_value
        self._exceptions = exceptions
        self._on_fallback = on_fallback
        self._name = name
        self._observer = observer

    # The decorated function returns "its own type or the fallback's": a fallback of
    # None on `-> Story` gives `-> Story | None`, which is what callers must handle.
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T | R]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T | R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        name = self._name or name_of(fn)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def degrading(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except self._exceptions as error:
                    return self._fallback(name, error)

            return degrading

        @functools.wraps(fn)
        def degrading_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return fn(*args, **kwargs)
            except self._exceptions as error:
                return self._fallback(name, error)

        return degrading_sync

    def _fallback(self, name: str, error: BaseException) -> R:
        # Only ordinary errors degrade: a cancellation (or KeyboardInterrupt) always
        # propagates, even when `exceptions` names BaseException.
        if not isinstance(error, Exception):
            raise error
        notify_observer(self._observer.fallback, name, error)
        if self._on_fallback is not None:
            notify_observer(self._on_fallback, error)
        if callable(self._fallback_value):
            return self._fallback_value()
        return self._fallback_value


@overload
def graceful_degradation(
    fallback_value: Callable[[], R],
    *,
    exceptions: tuple[type[BaseException], ...] = ...,
    on_fallback: Callable[[BaseException], None] | None = ...,
    name: str | None = ...,
    observer: ResilienceObserver = ...,
) -> _Degrade[R]: ...


@overload
def graceful_degradation(
    fallback_value: R,
    *,
    exceptions: tuple[type[BaseException], ...] = ...,
    on_fallback: Callable[[BaseException], None] | None = ...,
    name: str | None = ...,
    observer: ResilienceObserver = ...,
) -> _Degrade[R]: ...


def graceful_degradation(
    fallback_value: R | Callable[[], R],
    *,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
    on_fallback: Callable[[BaseException], None] | None = None,
    name: str | None = None,
    observer: ResilienceObserver = DEFAULT_OBSERVER,
) -> _Degrade[R]:
    """Decorator: when the async or sync function raises one of `exceptions`, return
    the fallback instead (the function is not called again). The decorated function
    is typed as returning its own type or the fallback's (`-> Story | None` for a
    fallback of None on `-> Story`).

    `fallback_value` is returned as is, unless it is callable: then it is called with
    no arguments for each fallback (use that for mutable or computed values; to
    return a callable itself, wrap it: `lambda: my_callable`). Each fallback is
    reported to `observer.fallback` (logged by the default observer) and passed to
    `on_fallback`. `asyncio.CancelledError` always propagates.
    """
    return _Degrade(fallback_value, exceptions, on_fallback, name, observer)
