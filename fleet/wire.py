"""The connection a replica's script calls go out on: calls written together, replies read
the moment they arrive.

redis-py opens the connection (TLS, AUTH, SELECT: whatever REDIS_URL says), then ``Wire``
takes its transport over as its protocol. While no batch is out, the calls made in one
turn of the event loop are written together at its end; while one is out, calls wait and
go together when its last reply is in, so a busy replica's calls share round trips (each
write to Redis is a system call, about as dear as the call's own work). Replies are
parsed by hiredis in ``data_received`` and resolve their calls' futures there, in the
loop turn they arrive in: through redis-py's stream reader each round trip took a task of
its own and two more turns of the loop, which cost more CPU than the call itself.

A batch that has no answer within the timeout, or a connection that breaks, fails every
call waiting on it with ``FleetDown`` and closes the connection: ``on_lost`` tells the
link, which marks Redis down until its probe hears from it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import NoScriptError, ResponseError


class FleetDown(Exception):
    """Redis could not be reached (or did not answer in time): the caller falls back."""


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class Wire:
    """An asyncio protocol by its methods (a plain class, so that mypyc compiles it: it is
    on every admission's path)."""

    def __init__(self, owner: Any, transport: asyncio.Transport, timeout: float,
                 on_lost: Callable[[BaseException], None],
                 observe: Callable[[float], None],
                 on_noscript: Callable[[bytes, asyncio.Future[Any], NoScriptError], None]) -> None:
        self._owner = owner  # redis-py's connection: kept, so nothing closes it under us
        self.transport = transport
        self.timeout = timeout
        self.on_lost = on_lost
        self.observe = observe  # each batch's round trip, in seconds
        self.on_noscript = on_noscript  # a call whose script Redis does not know (yet)
        self._sent_at = 0.0
        self.closed = False
        self._reader = hiredis.Reader(replyError=_reply_error)
        self._out: deque[tuple[bytes, asyncio.Future[Any]]] = deque()  # calls sent, in order
        self._next: list[tuple[bytes, asyncio.Future[Any]]] = []  # calls waiting for a turn
        self._deadline: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None  # a close waiting for answers
        self._flushing = False  # a write of the calls waiting is scheduled
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, connection: Any, batch_timeout: float,
                   on_lost: Callable[[BaseException], None],
                   observe: Callable[[float], None],
                   on_noscript: Callable[[bytes, asyncio.Future[Any], NoScriptError], None]
                   ) -> Wire:
        """Take over ``connection`` (a redis-py asyncio connection), once it is connected."""
        await connection.connect()
        writer = getattr(connection, "_writer", None)
        if writer is None:  # a redis-py that keeps its transport elsewhere
            raise RuntimeError("this redis-py version's connection has no stream writer")
        transport = writer.transport
        wire = cls(connection, transport, batch_timeout, on_lost, observe, on_noscript)
        transport.set_protocol(wire)  # a protocol by its methods
        return wire

    @property
    def waiting(self) -> int:
        return len(self._out) + len(self._next)

    def send(self, packed: bytes, done: asyncio.Future[Any]) -> None:
        """Write a call now, or with the next batch while one is out."""
        self.send_all([(packed, done)])

    def send_all(self, calls: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        """Write calls now in one write, or with the next batch while one is out."""
        if self.closed:
            for _, done in calls:
                done.set_exception(FleetDown("the connection to Redis is closed"))
            return
        self._next.extend(calls)
        if not self._out and not self._flushing:
            # written once this turn of the loop is done: every call made in it, one write
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._out or not self._next or self.closed:
            return  # a batch is out (what waits goes when it is in), or nothing to send
        # a call given up on before it went (its client left) is not sent at all
        batch = [call for call in self._next if not call[1].done()]
        self._next = []
        if not batch:
            return
        self._out.extend(batch)
        self._write(batch[0][0] if len(batch) == 1 else b"".join(p for p, _ in batch))

    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        self._sent_at = time.perf_counter()
        if self._deadline is None:
            self._deadline = self._loop.call_later(self.timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        out = self._out
        while out:
            reply = reader.gets()
            if reply is False:
                break
            packed, done = out.popleft()
            if done.done():
                continue
            if isinstance(reply, NoScriptError):
                self.on_noscript(packed, done, reply)
            elif isinstance(reply, ResponseError):
                done.set_exception(reply)
            else:
                done.set_result(reply)
        if not out:
            self.observe(time.perf_counter() - self._sent_at)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if self._next:  # the batch is in: what waited goes as the next one
                self._flush()
            elif self._drain_waiter is not None and not self._drain_waiter.done():
                self._drain_waiter.set_result(None)

    def _expired(self) -> None:
        self._deadline = None
        self._fail(TimeoutError(f"Redis did not answer within {self.timeout:g}s"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # taken over connected: never called

    def eof_received(self) -> bool:
        return False  # Redis closed its side: the transport closes, connection_lost says so

    def pause_writing(self) -> None:
        pass  # calls are small and answered in turn: nothing to hold back

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("Redis closed the connection"))

    def close(self) -> None:
        self._fail(ConnectionError("the connection to Redis was closed"))

    async def drained(self, within: float) -> None:
        """Until every call sent has its answer, or ``within`` seconds (a clean close)."""
        if not self.waiting or self.closed:
            return
        self._drain_waiter = self._loop.create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._drain_waiter

    def _fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.transport.close()
        # the connection redis-py opened is closed: it must not warn of it when collected
        self._owner._writer = self._owner._reader = None
        waiting = [done for _, done in self._out] + [done for _, done in self._next]
        self._out.clear()
        self._next.clear()
        for done in waiting:
            if not done.done():
                done.set_exception(FleetDown(str(exc) or type(exc).__name__))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self.on_lost(exc)
