"""Background tasks the service runs beside its requests (system sampler,
maintenance-flag poller, expired-key purge): how one repeats, how one is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


async def every(
    seconds: float, step: Callable[[], Awaitable[None]], *, what: str, at_once: bool = False
) -> None:
    """Awaits `step()` every `seconds` (first right away when `at_once`) until cancelled.

    A step that fails is logged as "`what` failed" and waits for the next round.
    """
    if not at_once:
        await asyncio.sleep(seconds)
    while True:
        try:
            await step()
        except Exception as error:
            logger.warning("%s failed", what, extra={"error": repr(error)})
        await asyncio.sleep(seconds)


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancels `task` and waits until it has stopped; None does nothing."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
