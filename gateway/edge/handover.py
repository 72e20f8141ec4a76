"""Hands a request that is not on the token path to the aiohttp application.

Probes, /metrics, /admin and CORS preflights keep aiohttp's routing and the
middlewares in gateway/middlewares.py. For each such request a fresh aiohttp
``RequestHandler`` (the protocol aiohttp's own server would use) is given a
transport that writes to the client's connection, and is fed the request as
received, re-framed with a Content-Length. It answers; its access-log hook says
when the answer is complete (and whether the connection may be kept), and the
handler is then retired while the connection goes on with the next request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.edge.call import Call
from gateway.edge.server import HttpConnection

# hop-by-hop or framing headers: the re-framed request sets its own
_DROP = frozenset({b"connection", b"keep-alive", b"expect", b"transfer-encoding",
                   b"content-length", b"upgrade", b"te", b"trailer"})


class Tunnel:
    """``await tunnel(call)`` answers ``call`` with the aiohttp app behind ``runner``."""

    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    async def __call__(self, call: Call) -> None:
        server = self.runner.server
        assert server is not None, "AppRunner.setup() not called"
        conn = call.conn
        assert isinstance(conn, HttpConnection)  # calls come from the edge server's connections
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        handler = server()
        transport = _Transport(conn, handler, done)
        conn.tunnel = handler
        try:
            handler.connection_made(transport)
            if conn.paused:  # the client is behind already: aiohttp must wait for it too
                handler.pause_writing()
            handler.data_received(_reframe(call))
            keep_alive = await done
        finally:
            conn.tunnel = None
            if not done.done():  # cancelled, or a bug: what aiohttp wrote may be half an answer
                done.cancel()
                asyncio.get_running_loop().call_soon(handler.connection_lost, None)
                call.settled()
                conn.close()
        call.settled()
        if not keep_alive:
            call.keep_alive = False
        conn.finished(call)


def _reframe(call: Call) -> bytes:
    """The request as aiohttp should see it: the client's method, target, version and
    headers, the whole body with its length, and whether the connection is kept."""
    version = b"1.1" if call.http11 else b"1.0"
    head = [b"%b %b HTTP/%b\r\n" % (call.method.encode("latin-1"), call.target, version)]
    head += [b"%b: %b\r\n" % (n, v) for n, v in call.raw_headers if n.lower() not in _DROP]
    if not call.keep_alive:
        head.append(b"Connection: close\r\n")
    elif not call.http11:
        head.append(b"Connection: keep-alive\r\n")
    if "host" not in call.headers:  # aiohttp refuses a request without one; HTTP/1.0 may omit it
        head.append(b"Host: localhost\r\n")
    head.append(b"Content-Length: %d\r\n\r\n" % len(call.body))
    return b"".join(head) + call.body


class _Transport(asyncio.Transport):
    """What the aiohttp handler sees as its connection: the client's, for one request."""

    def __init__(self, conn: HttpConnection, handler: Any, done: asyncio.Future[bool]) -> None:
        super().__init__()
        self.conn = conn
        self.handler = handler
        self.done = done
        self._closed = False

    def finished(self, keep_alive: bool) -> None:
        if not self.done.done():
            self.done.set_result(keep_alive)
        # as a transport would on a client that hangs up between requests
        asyncio.get_running_loop().call_soon(self.handler.connection_lost, None)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closed:
            self.conn.write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        if not self._closed:
            self.conn.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self._closed or self.conn.closing

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.done.done():  # aiohttp gave up on the connection before answering
            self.done.set_result(False)
            asyncio.get_running_loop().call_soon(self.handler.connection_lost, None)

    def abort(self) -> None:
        self.close()
        self.conn.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.conn.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        transport = self.conn.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass  # the whole request is already in hand

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def can_write_eof(self) -> bool:
        return False


class Finished(AbstractAccessLogger):
    """aiohttp calls this once an answer is written: the tunnel's end-of-response signal."""

    def __init__(self, logger: Any, log_format: str) -> None:
        super().__init__(logger, log_format)

    @property
    def enabled(self) -> bool:
        return True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        if isinstance(transport, _Transport):
            # an HTTP/1.0 answer of no stated length ends with the connection (aiohttp
            # still reports keep-alive for it)
            delimited = request.version >= (1, 1) or response.content_length is not None
            transport.finished(bool(response.keep_alive) and delimited)
