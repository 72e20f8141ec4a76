"""The gateway's HTTP/1.1 server: parsed by httptools, answered in as few writes as possible.

aiohttp's server cost ~75 µs of CPU per request on the machines we measure on, more
than the rest of the proxy's hot path together (a bare httptools protocol proxying the
same request: ~40 µs). So the requests that carry tokens (`/v1/*`, except CORS
preflights) are served here directly, by the handler given to ``EdgeServer``; every
other request (probes, /metrics, /admin, preflights) is handed to the aiohttp
application through ``gateway/tunnel.py``, with its middlewares and routes as they are.

Per connection, requests are answered one at a time in order (pipelined ones wait
in ``pending``). Each request runs in its own task, which is cancelled when the client
goes away: that is what stops backend work for a departed client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httptools

from gateway.http_call import Call, Handler

log = logging.getLogger("llamagate.gateway.http")

# a pipelining client may queue this many requests before we stop reading from it
MAX_PENDING = 16




class EdgeServer:
    """Owns the listening socket's connections; ``fast`` decides who answers a request."""

    def __init__(self, state: Any, handler: Handler, tunnel: Handler,
                 decorate: Callable[[Call], str], max_body: int,
                 keepalive_timeout: float = 75.0) -> None:
        self.state = state
        self.handler = handler
        self.tunnel = tunnel
        self.decorate = decorate
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._date = ("", 0)
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    @staticmethod
    def fast(method: str, path: str) -> bool:
        return path.startswith("/v1/") and method != "OPTIONS"

    def date(self) -> str:
        now = int(time.time())
        if now != self._date[1]:
            self._date = (formatdate(now, usegmt=True), now)
        return self._date[0]

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False,
                     backlog: int = 2048) -> asyncio.Server:
        server = await asyncio.get_running_loop().create_server(
            self, host, port, reuse_port=reuse_port or None, backlog=backlog)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="http-keepalive")
        return server

    async def stop_listening(self) -> None:
        """Take no new connections; close the idle ones; busy ones close after their answer."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()

    async def close(self) -> None:
        await self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()

    async def _sweep(self) -> None:
        # one periodic pass instead of a timer per connection per request
        while True:
            await asyncio.sleep(min(5.0, self.keepalive_timeout / 2))
            limit = time.monotonic() - self.keepalive_timeout
            for conn in list(self.connections):
                if conn.idle and conn.idle_since < limit:
                    conn.close()


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer: Any = None
        self.closed = False
        self.paused = False
        self.http11 = True
        self.task: asyncio.Task[None] | None = None
        self.current: Call | None = None
        self.tunnel: asyncio.BaseProtocol | None = None  # aiohttp's, while it answers
        self.pending: collections.deque[Call] = collections.deque()
        self.idle_since = time.monotonic()
        self._drain: asyncio.Future[None] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._refused = False

    @property
    def idle(self) -> bool:
        return self.task is None and not self.pending

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.peer = transport.get_extra_info("peername")
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.connection_lost(exc)
        if self.task is not None and self.current is not None and not self.current._done:
            self.task.cancel()  # the client left: stop the backend's work for it
        self.pending.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError:
            if not self._refused:
                self._refuse(400, "malformed HTTP request")

    def pause_writing(self) -> None:
        self.paused = True
        if self.tunnel is not None:
            self.tunnel.pause_writing()

    def resume_writing(self) -> None:
        self.paused = False
        if self.tunnel is not None:
            self.tunnel.resume_writing()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        expect = False
        for name, value in self._headers:  # names compared by length first: most are neither
            if len(name) == 14 and name.lower() == b"content-length":
                if value.isdigit() and int(value) > self.server.max_body:
                    self._too_large()
                    return
            elif len(name) == 6 and name.lower() == b"expect":
                expect = value.lower() == b"100-continue"
        if expect:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body:
            self._too_large()
            raise httptools.HttpParserError("body too large")  # stops the parser
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._dispatch(self._call(body, self.parser.should_keep_alive()))

    def _call(self, body: bytes, keep_alive: bool) -> Call:
        parser = self.parser
        self.http11 = parser.get_http_version() == "1.1"
        headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in self._headers}
        target = self._url
        if not target.startswith(b"/"):  # absolute form, as sent to a proxy
            url = httptools.parse_url(target)
            target = (url.path or b"/") + (b"?" + url.query if url.query else b"")
        return Call(self, parser.get_method().decode("latin-1"), target, headers, self._headers,
                    body, keep_alive)

    def _too_large(self) -> None:
        """Answered with 413 by the handler (so it is logged and counted), then closed:
        the unread body cannot be skipped to find the next request."""
        if self._refused:
            return
        self._refused = True
        call = self._call(b"", keep_alive=False)
        call.too_large = True
        self._dispatch(call)

    def _dispatch(self, call: Call) -> None:
        if self.task is None:
            self._run(call)
        else:
            self.pending.append(call)
            if len(self.pending) >= MAX_PENDING and self.transport is not None:
                self.transport.pause_reading()

    # answering

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    def finished(self, call: Call) -> None:
        if not call.keep_alive or self.server.closing:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered first

    def _run(self, call: Call) -> None:
        fast = call.too_large or self.server.fast(call.method, call.path)
        answer = self.server.handler if fast else self.server.tunnel
        self.current = call
        self.task = asyncio.get_running_loop().create_task(self._serve(call, answer))

    async def _serve(self, call: Call, answer: Handler) -> None:
        try:
            await answer(call)
        except asyncio.CancelledError:
            pass  # the client left, or shutdown ended the request
        except Exception:  # the handler renders its own errors; this is a bug
            log.exception("unhandled error answering a request")
        finally:
            call.abandon()
            self.task = self.current = None
            self.idle_since = time.monotonic()
        if self.pending and not self.closed:
            if self.transport is not None and len(self.pending) == MAX_PENDING:
                self.transport.resume_reading()
            self._run(self.pending.popleft())

    def _refuse(self, status: int, message: str, code: str = "invalid_request") -> None:
        """A request we cannot parse or accept: answer (if nothing is in progress) and close."""
        self._refused = True
        if self.task is None and not self.pending and not self.closed:
            body = (b'{"error":{"message":"%b","type":"invalid_request_error","param":null,'
                    b'"code":"%b"}}' % (message.encode(), code.encode()))
            call = Call(self, "POST", b"/", {}, [], b"", keep_alive=False)
            call.respond(status, body)
        else:
            self.close()
