"""The proxy's HTTP/1.1 client to llama-server: pooled keep-alive connections,
responses parsed by httptools (llhttp, the parser uvicorn uses), bodies handed
over as they arrive.

aiohttp's ClientSession cost more CPU per proxied request than the rest of the
gateway together; this client does only what the proxy needs, in one socket
write per request and one parser pass per socket read.

The contract the proxy relies on:

- at most ``size`` connections are open at once; a request beyond that waits;
- a response read to its end gives its connection back to the pool by itself
  (unless the backend answered ``Connection: close``); ``Response.close()`` on an
  unfinished one closes the connection, which is how llama-server learns that
  the client left and frees the slot;
- a pooled connection that the backend closed before sending any byte of an
  answer is retried once, on a new connection: that is llama-server dropping an
  idle keep-alive connection as our request was on its way, so it never began
  the work. Nothing else is retried.

    BackendError
     ├── BackendConnectError   no connection could be made
     └── BackendBroken         the connection broke before the response was complete
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from typing import cast
from urllib.parse import urlsplit

import httptools

# body bytes of an unread stream buffered here before reading from the backend pauses
_PAUSE_AT = 1 << 18


class BackendError(Exception):
    pass


class BackendConnectError(BackendError):
    pass


class BackendBroken(BackendError):
    pass


class Response:
    """One backend response; ``status`` and ``content_type`` are set when it is returned."""

    __slots__ = ("_chunks", "_conn", "_error", "_framed", "_got_bytes", "_head", "_headers_done",
                 "_read_all", "_size", "_waiter", "complete", "content_type", "keep_alive", "status")

    def __init__(self, conn: _Connection, head: bool) -> None:
        self._conn: _Connection | None = conn
        self._head = head  # a HEAD request: the answer has no body, whatever its headers say
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BackendBroken | None = None
        self._headers_done = False
        self._got_bytes = False
        self._framed = False  # Content-Length or chunked; otherwise the body ends at EOF
        self._read_all = False
        self.status = 0
        self.content_type = ""
        self.keep_alive = False
        self.complete = False

    async def read(self) -> bytes:
        """The whole body; raises BackendBroken if the connection breaks first."""
        self._read_all = True
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        while not self.complete:
            if self._error is not None:
                raise self._error
            await self._arm()
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read_chunk(self) -> bytes:
        """Everything that has arrived since the last call (waiting for something when
        nothing has); b"" at the end of the body. Raises BackendBroken if the
        connection breaks, once the bytes that did arrive have been returned."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._arm()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    def close(self) -> None:
        """Abandon the response: an unfinished one closes its connection."""
        conn = self._conn
        if conn is not None and not self.complete:
            self._conn = None
            conn.close()

    def _arm(self) -> asyncio.Future[None]:
        """A future that the connection resolves when something happens to this response
        (awaited directly by the reader: one coroutine frame fewer on every resume)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, message: str) -> None:
        if not self.complete and self._error is None:
            self._error = BackendBroken(message)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it parses the response of the request it carries."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.counted = True  # holds one of the pool's places
        self.uses = 0
        self.idle_since = 0.0
        self.paused = False

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # nothing may arrive unasked on an idle connection
            self.close()
            return
        resp._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp._fail(f"invalid response from the backend ({type(exc).__name__})")
            self.resp = None
            self.close()
        else:
            if resp.complete:
                self._finish(resp)
            elif resp._size > _PAUSE_AT and not resp._read_all and not self.paused:
                self.paused = True  # the client reads slower than the backend writes
                assert self.transport is not None
                self.transport.pause_reading()
        resp._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._forget(self)
        resp = self.resp
        if resp is None:
            return
        self.resp = None
        if resp._headers_done and not resp._framed and not resp.complete and \
                resp.status >= 200 and resp.status not in (204, 304):
            resp.complete = True  # a body delimited by the end of the connection
        else:
            reason = type(exc).__name__ if exc is not None else "closed by the backend"
            resp._fail(f"the backend connection broke ({reason})")
        resp._wake()

    # -- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp.complete:
            # a second answer to one request: stop parsing (the error closes the connection)
            raise BackendBroken("the backend sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        assert resp is not None
        lower = name.lower()
        if lower == b"content-type":
            resp.content_type = value.decode("latin-1")
        elif lower == b"content-length" or lower == b"transfer-encoding":
            resp._framed = True

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = self.parser.get_status_code()
        resp.keep_alive = self.parser.should_keep_alive()
        resp._headers_done = True
        if resp._head:
            # llhttp would wait for the body the headers announce; end here and do not
            # reuse a connection whose parser is mid-message
            resp.complete, resp.keep_alive = True, False

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if not resp.complete:
            resp._chunks.append(body)
            resp._size += len(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.complete = True

    # -- the pool's side -------------------------------------------------------------
    def send(self, resp: Response, data: bytes) -> None:
        assert self.transport is not None
        self.resp = resp
        self.uses += 1
        if self.transport.is_closing():  # closed by the backend; connection_lost is on its way
            resp._fail("the backend connection broke (closed by the backend)")
            return
        self.transport.write(data)

    @property
    def usable(self) -> bool:
        return self.counted and self.transport is not None and not self.transport.is_closing()

    def _finish(self, resp: Response) -> None:
        self.resp = None
        resp._conn = None
        if resp.keep_alive and self.counted:
            if self.paused:
                self.resume()
            self.pool._put(self)
        else:
            self.close()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.pool._forget(self)


class BackendPool:
    """Keep-alive connections to one backend, at most ``size`` of them open."""

    def __init__(self, base_url: str, size: int, headers: dict[str, str] | None = None,
                 idle_timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        self.size = size
        self.idle_timeout = idle_timeout
        host_header = parts.netloc.rpartition("@")[2]
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in
                              {"Host": host_header, "Accept-Encoding": "identity",
                               **(headers or {})}.items())
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (the pool is at its size)."""
        return sum(not w.done() for w in self._waiters)

    async def request(self, method: str, target: str, body: bytes = b"",
                      headers: str = "") -> Response:
        """Send a request and return its response once the headers are in.

        ``target`` is the path and query; ``headers`` are extra ``Name: value\\r\\n``
        lines. On cancellation while waiting, the connection is closed.
        """
        if body or method in ("POST", "PUT", "PATCH"):
            headers += f"Content-Length: {len(body)}\r\n"
        head = f"{method} {self.prefix}{target} HTTP/1.1\r\n{self._fixed}{headers}\r\n"
        data = head.encode("utf-8", "surrogateescape")
        if body:
            data += body
        is_head = method == "HEAD"
        conn = await self._acquire(fresh=False)
        while True:
            resp = Response(conn, is_head)
            conn.send(resp, data)
            try:
                while not resp._headers_done:
                    if resp._error is not None:
                        raise resp._error
                    await resp._arm()
            except BackendBroken:
                # a reused connection closed before any answer: the backend dropped it
                # as idle, so the request never started; once, on a new connection
                if conn.uses > 1 and not resp._got_bytes:
                    conn.close()
                    conn = await self._acquire(fresh=True)
                    continue
                raise
            except BaseException:
                conn.close()  # cancelled (timeout, client gone): llama-server must stop
                raise
            return resp

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(BackendConnectError(
                    "cannot reach the backend (the connection pool is closed)"))

    async def _acquire(self, fresh: bool) -> _Connection:
        while True:
            if self._closed:
                raise BackendConnectError("cannot reach the backend (the connection pool is closed)")
            now = time.monotonic()
            while self._idle and not fresh:
                conn = self._idle.pop()
                if now - conn.idle_since < self.idle_timeout and conn.usable:
                    return conn
                conn.close()
            if fresh and self._open >= self.size and self._idle:
                self._idle.pop(0).close()  # make room: the oldest idle one goes
            if self._open < self.size:
                return await self._connect()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken while being cancelled: pass the turn on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        self._open += 1
        made: list[_Connection] = []

        def factory() -> _Connection:
            made.append(_Connection(self))
            return made[-1]

        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                factory, self.host, self.port, ssl=self.ssl)
        except BaseException as exc:
            if made:
                made[0].close()  # frees the place, once
            else:
                self._open -= 1
                self._wake()
            if isinstance(exc, OSError):
                raise BackendConnectError(f"cannot reach the backend ({type(exc).__name__})") from exc
            raise
        return conn

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake()

    def _forget(self, conn: _Connection) -> None:
        """A connection closed (by us or the backend): free its place. Idempotent."""
        if not conn.counted:
            return
        conn.counted = False
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
