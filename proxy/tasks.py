"""Background tasks that live exactly as long as the app: started, then cancelled and awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def running(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `coroutines` as tasks for the duration of the block; on leaving, cancel them and
    wait until they have stopped, so nothing outlives the app's cleanup."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            await _stop(task)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` until it ends. A library can absorb a cancellation that lands inside one of
    its own timeouts (aiohttp's and redis-py's have), and a task that never ends would hold the
    server's shutdown for its whole drain time; so it is asked again, a bounded number of times."""
    for _ in range(100):
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
        if task.done():
            break
    else:
        return  # left to the loop's end: a stuck task must not stop the shutdown
    with contextlib.suppress(asyncio.CancelledError):
        await task
