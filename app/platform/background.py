"""Background tasks the service runs beside its requests (system sampler,
maintenance-flag poller, expired-key purge): how one is stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancels `task` and waits until it has stopped; None does nothing."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
