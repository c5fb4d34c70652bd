"""What makes an awaited pull from a stream cancel-safe on the Python side (used by the native
module; not public API)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def guard(fut: Awaitable[T], give_back: Callable[[T], None]) -> T:
    """Awaits `fut`; if the awaiting task is cancelled after `fut` resolved but before the task
    resumed (asyncio then throws CancelledError in and the value would be discarded), hands the
    value to `give_back`, which puts it back into its stream."""
    try:
        return await fut
    except asyncio.CancelledError:
        f = asyncio.ensure_future(fut)
        if f.done() and not f.cancelled() and f.exception() is None:
            value = f.result()
            if value is not None:
                give_back(value)
        raise
