"""Bounded admission to the backend: at most `limit` requests in flight, at most
`max_queue` waiting, each waiter for at most `timeout` seconds.

Waiters are served first in, first out. A waiter whose task is cancelled (its
client went away) leaves the queue and never takes a slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Protocol


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class AdmissionClosed(Exception):
    """The admission queue is gone (several workers: the serve process is ending)."""


class Slots(Protocol):
    """What the proxy needs of admission: this module's `Admission` in a single worker,
    gateway/policy/shared_admission.py's client of the serve process's queue in several."""

    in_flight: int

    @property
    def queued(self) -> int: ...

    async def acquire(self) -> None: ...

    def release(self) -> None: ...

    def refuse_waiting(self) -> None: ...


class Admission:
    def __init__(self, limit: int, max_queue: int, timeout: float) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.timeout = timeout
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def join(self) -> asyncio.Future[None] | None:
        """None: a place is taken. Otherwise a place in the queue: a future resolved when a
        place is handed over, or failed with QueueTimeout at the deadline. Raises QueueFull."""
        if self.in_flight < self.limit and not self._waiters:  # a free place, nobody before
            self.in_flight += 1
            return None
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        # one timer on the waiter itself: wait_for(shield(...)) would build two more
        # futures and a timeout per queued request, on the path every request takes under load
        timer = loop.call_later(self.timeout, _expire, fut)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def leave(self, fut: asyncio.Future[None]) -> None:
        """A waiter that gives up: out of the queue, or, handed a place meanwhile, it passes
        the place on."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release()
        else:
            fut.cancel()
            self._discard(fut)

    async def acquire(self) -> None:
        fut = self.join()
        if fut is None:
            return
        try:
            await fut
        except QueueTimeout:
            self._discard(fut)
            raise
        except asyncio.CancelledError:
            self.leave(fut)
            raise

    def refuse_waiting(self) -> None:
        """Draining: the requests still queued are refused now (503), not served late."""
        waiters, self._waiters = self._waiters, collections.deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(AdmissionClosed("the server is shutting down"))

    def _discard(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self) -> None:
        # hand the slot straight to the next waiter so in_flight never dips and a
        # newcomer cannot overtake the queue
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.in_flight -= 1


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a slot handed over at the deadline is kept
        fut.set_exception(QueueTimeout())
