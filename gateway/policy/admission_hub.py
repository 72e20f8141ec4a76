"""One admission queue for all gateway workers (GATEWAY_WORKERS > 1).

Each worker runs its own event loop, so an `Admission` in each would let N workers
put N × MAX_CONCURRENT_REQUESTS requests on the backend and queue N × MAX_QUEUE_SIZE.
With more than one worker the serve process holds the only `Admission`, and workers
ask it for places over a Unix socket (the worker's side: gateway/policy/shared_admission.py).
The price is one round trip per request, paid only with several workers.

Messages are 9 bytes both ways: an op and a request number chosen by the worker.

    worker → hub   ACQUIRE n    CANCEL n (its client left while queued)    RELEASE 0
    hub → worker   GRANTED n    DRAIN ms, then FULL n    TIMEOUT n

DRAIN carries the full queue's drain estimate in milliseconds (QueueFull.drain) for the
FULL that follows it.

A worker whose connection drops (it crashed) gives back every place it held and its
waiters leave the queue.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path
from typing import cast

from gateway.policy.admission import Admission, QueueFull

MESSAGE = struct.Struct("!cQ")
ACQUIRE, CANCEL, RELEASE = b"a", b"c", b"r"
GRANTED, FULL, TIMEOUT, DRAIN = b"g", b"f", b"t", b"d"


def messages(buffer: bytes, data: bytes) -> tuple[list[tuple[bytes, int]], bytes]:
    """The whole messages in ``buffer + data``, and the start of one still to come."""
    buffer += data
    whole = len(buffer) - len(buffer) % MESSAGE.size
    return list(MESSAGE.iter_unpack(buffer[:whole])), buffer[whole:]


class _Worker(asyncio.Protocol):
    """One worker's connection: its queued requests and the places it holds. Requests join
    the one queue as their messages are read, so the queue is first in, first out across
    workers; no task per request."""

    def __init__(self, admission: Admission, gone: Callable[[_Worker], None]) -> None:
        self.admission = admission
        self._gone = gone
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.held = 0
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        received, self.buffer = messages(self.buffer, data)
        for op, number in received:
            if op == ACQUIRE:
                self._acquire(number)
            elif op == CANCEL:
                fut = self.waiting.pop(number, None)
                if fut is not None:  # else answered already; a GRANTED comes back as RELEASE
                    self.admission.leave(fut)
            elif op == RELEASE and self.held > 0:
                self.held -= 1
                self.admission.release()

    def _acquire(self, number: int) -> None:
        try:
            fut = self.admission.join()
        except QueueFull as full:
            self._reply(DRAIN, round(full.drain * 1000))
            self._reply(FULL, number)
            return
        if fut is None:
            self._granted(number)
        else:
            self.waiting[number] = fut
            fut.add_done_callback(lambda f: self._settled(number, f))

    def _settled(self, number: int, fut: asyncio.Future[None]) -> None:
        if self.waiting.get(number) is not fut:
            return  # cancelled or the connection lost before this ran: leave() saw to it
        del self.waiting[number]
        if fut.cancelled():
            return
        if fut.exception() is None:
            self._granted(number)
        else:  # QueueTimeout
            self.admission.leave(fut)
            self._reply(TIMEOUT, number)

    def _granted(self, number: int) -> None:
        self.held += 1
        self._reply(GRANTED, number)

    def _reply(self, op: bytes, number: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(MESSAGE.pack(op, number))
        elif op == GRANTED:  # nobody left to use it
            self.held -= 1
            self.admission.release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(self)
        self.transport = None
        waiting, self.waiting = self.waiting, {}
        for fut in waiting.values():
            self.admission.leave(fut)
        for _ in range(self.held):
            self.admission.release()
        self.held = 0


class AdmissionHub:
    """The serve process's side: listens on ``path`` and admits for every worker."""

    def __init__(self, admission: Admission, path: Path) -> None:
        self.admission = admission
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._workers: set[_Worker] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connected, str(self.path))

    def _connected(self) -> _Worker:
        worker = _Worker(self.admission, self._workers.discard)
        self._workers.add(worker)
        return worker

    async def close(self) -> None:
        """Stop listening and close every worker's connection (their waiters get 503)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for worker in list(self._workers):
            if worker.transport is not None:
                worker.transport.close()
        await asyncio.sleep(0)  # connection_lost runs on the next loop pass
