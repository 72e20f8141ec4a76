"""The proxy's HTTP/1.1 client to llama-server: pooled keep-alive connections,
responses parsed by httptools (llhttp, the parser uvicorn uses), bodies handed
over as they arrive.

aiohttp's ClientSession cost more CPU per proxied request than the rest of the
gateway together; this client does only what the proxy needs, in one socket
write per request (sent with others of the same loop pass: gateway/edge/write_batch.py)
and one parser pass per socket read.

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
import ssl
import time
from urllib.parse import urlsplit

from gateway.edge.write_batch import WriteBatch
from gateway.upstream.connection import (
    BackendBroken,
    BackendConnectError,
    BackendError,
    Connection,
    Response,
)

__all__ = ["BackendBroken", "BackendConnectError", "BackendError", "BackendPool", "Response"]


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
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self.batch = WriteBatch()  # requests sent while the loop is busy go out together

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

    async def _acquire(self, fresh: bool) -> Connection:
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

    async def _connect(self) -> Connection:
        self._open += 1
        made: list[Connection] = []

        def factory() -> Connection:
            made.append(Connection(self))
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

    def put(self, conn: Connection) -> None:
        """A connection whose response was read to its end goes back to the idle set."""
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake()

    def forget(self, conn: Connection) -> None:
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
