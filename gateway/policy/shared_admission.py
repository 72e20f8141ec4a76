"""A worker's admission when there are several workers: places come from the serve
process's single queue (gateway/policy/admission_hub.py, which says why and the wire format).

Same interface as `Admission`: ``acquire`` waits for a place or raises QueueFull /
QueueTimeout as the hub decides; a cancelled ``acquire`` (the client left) takes its
request out of the hub's queue, or gives back a place granted meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import cast

from gateway.policy.admission import UNMEASURED_DRAIN, AdmissionClosed, QueueFull, QueueTimeout
from gateway.policy.admission_hub import (
    ACQUIRE,
    CANCEL,
    DRAIN,
    FULL,
    GRANTED,
    MESSAGE,
    RELEASE,
    messages,
)

_RELEASE = MESSAGE.pack(RELEASE, 0)


class SharedAdmission(asyncio.Protocol):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_flight = 0  # places this worker holds
        self.transport: asyncio.Transport | None = None
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._numbers = itertools.count(1)
        self._buffer = b""
        self._drain = UNMEASURED_DRAIN  # the last DRAIN: the hub sends one before each FULL
        self._drains: dict[int, float] = {}  # refused request → the drain estimate it got

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def connect(self) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: self, str(self.path))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def acquire(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise AdmissionClosed("the serve process's admission queue is gone")
        number = next(self._numbers)
        waiter = self._waiting[number] = asyncio.get_running_loop().create_future()
        transport.write(MESSAGE.pack(ACQUIRE, number))
        try:
            answer = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None \
                    and waiter.result() == GRANTED:
                self._give_back()  # granted while being cancelled
            elif not transport.is_closing():
                transport.write(MESSAGE.pack(CANCEL, number))
            raise
        finally:
            self._waiting.pop(number, None)
            drain = self._drains.pop(number, UNMEASURED_DRAIN)
        if answer == GRANTED:
            self.in_flight += 1
            return
        if answer == FULL:
            raise QueueFull(drain)
        raise QueueTimeout

    def release(self) -> None:
        self.in_flight -= 1
        self._give_back()

    def refuse_waiting(self) -> None:
        """Draining: this worker's queued requests are refused now and leave the hub's queue."""
        for number, waiter in list(self._waiting.items()):
            if not waiter.done():
                waiter.set_exception(AdmissionClosed("the server is shutting down"))
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(MESSAGE.pack(CANCEL, number))

    def _give_back(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_RELEASE)

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        received, self._buffer = messages(self._buffer, data)
        for answer, number in received:
            if answer == DRAIN:
                self._drain = number / 1000
                continue
            if answer == FULL and number in self._waiting:
                self._drains[number] = self._drain
            waiter = self._waiting.get(number)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)
            elif answer == GRANTED:  # its request was cancelled after the hub granted it
                self._give_back()

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(AdmissionClosed("the serve process's admission queue is gone"))
        self._waiting.clear()
