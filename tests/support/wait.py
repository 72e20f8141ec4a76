"""Waiting for a condition with a deadline, the tests' one way to synchronise with state
that signals no event (a queue's depth, a file on disk, a process's answer).

Both forms take the same arguments: ``cond`` (a callable; ``wait_until`` also awaits what
it returns when that is awaitable), ``what`` (named in the failure), and ``within`` seconds.
They return the first truthy value ``cond`` gave, and fail the test after the deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

WITHIN = 10.0  # seconds: a deadline for a failure, never a pace the tests rely on
POLL = 0.005  # seconds between looks: the period of a deadline wait, not synchronisation


@overload
async def wait_until(cond: Callable[[], Awaitable[T | None]], what: str, *,
                     within: float = WITHIN) -> T: ...
@overload
async def wait_until(cond: Callable[[], T | None], what: str, *, within: float = WITHIN) -> T: ...
async def wait_until(cond: Callable[[], Any], what: str, *, within: float = WITHIN) -> Any:
    """Poll ``cond`` on the running loop until it gives a truthy value."""
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(POLL)


def wait_for(cond: Callable[[], T | None], what: str, *, within: float = WITHIN) -> T:
    """``wait_until`` for code without a loop (a service run as a subprocess)."""
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(POLL * 4)
