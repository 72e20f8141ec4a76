"""Bounded admission to the backend: at most `limit` requests in flight, at most
`max_queue` waiting, each waiter for at most `timeout` seconds.

Waiters are served first in, first out. A waiter whose task is cancelled (its
client went away) leaves the queue and never takes a slot.

A full queue refuses with the time it would take to drain (``QueueFull.drain``): the
places ahead of a newcomer times the measured gap between releases while every place is
taken, an exponentially weighted mean (1/5 weight to the newest), which is the backend's
pace under load. The Retry-After built from it (gateway/upstream/slots.py) spreads the
refused clients' retries instead of sending them all back one second later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Final, Protocol

# the drain estimate before any release was measured under load: nothing is known yet
UNMEASURED_DRAIN: Final = 5.0
_WEIGHT: Final = 0.2  # of the newest gap in the mean


class QueueFull(Exception):
    def __init__(self, drain: float) -> None:
        super().__init__(drain)
        self.drain = drain  # seconds the queue would take to drain at the measured pace


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
    def __init__(self, limit: int, max_queue: int, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self.max_queue = max_queue
        self.timeout = timeout
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._gap = 0.0  # mean seconds between releases while every place is taken
        self._last_release = 0.0  # of the run of such releases, 0 outside one

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
            raise QueueFull(self.drain_seconds())
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

    def drain_seconds(self) -> float:
        """How long the queue ahead of a newcomer takes to drain at the measured pace."""
        if self._gap <= 0:
            return UNMEASURED_DRAIN
        return (len(self._waiters) + 1) * self._gap

    def release(self) -> None:
        if self.in_flight >= self.limit:  # every place taken: releases pace the queue
            now = self._clock()
            if self._last_release:  # and they were since the last one
                gap = now - self._last_release
                self._gap = gap if not self._gap else self._gap + _WEIGHT * (gap - self._gap)
            self._last_release = now
        # hand the slot straight to the next waiter so in_flight never dips and a
        # newcomer cannot overtake the queue
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.in_flight -= 1
        self._last_release = 0.0  # a place is free: what follows is not the backend's pace


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a slot handed over at the deadline is kept
        fut.set_exception(QueueTimeout())
