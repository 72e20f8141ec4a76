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
- a request is sent again, once, on a new connection only when it provably never
  left: its connection was found closed before the write, or the write failed before
  one byte went out. A request whose bytes were sent is never repeated, even when the
  connection closes with no byte of an answer: the backend may have begun the work.
  What makes that rare is ``IDLE_SECONDS``;
- only GET, HEAD and POST go out, and only a POST with a body: llama-server reads no body
  of a method it does not route, and parses the bytes past its read window as requests of
  their own (issue 21). A GET's or HEAD's body (RFC 9110 gives it no meaning) is dropped;
- a connection whose answer began before its request was fully sent is closed, never
  pooled: the backend answered without reading all of it, and what it left unread would
  be read as the start of the next request.

    BackendError
     ├── BackendConnectError   no connection could be made
     └── BackendBroken         the connection broke before the response was complete
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

from gateway.edge.write_batch import WriteBatch
from gateway.upstream.connection import (
    BackendBroken,
    BackendConnectError,
    BackendError,
    Connection,
    Places,
    Response,
)

__all__ = ["BackendBroken", "BackendConnectError", "BackendError", "BackendPool", "Response"]

# what llama-server routes; a request with another method is a bug of the caller's
METHODS = frozenset({"GET", "HEAD", "POST"})

# How long a connection may idle in the pool and still carry a request. llama-server's
# HTTP library (cpp-httplib) closes keep-alive connections idle for 5 s
# (CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND); a request written as it closes one is lost and,
# having left, is not sent again (see above). Staying under its limit, a pooled
# connection is never one the backend is about to close.
IDLE_SECONDS = 4.0
# a connection idle longer than this is looked at (one poll) before reuse, in case the
# backend closed it and the loop has not seen that yet; one reused at once under load is
# not (the poll cost 4% of the CPU per request at concurrency 64), as a backend closes an
# idle connection after a timeout of seconds, not within milliseconds
LOOK_AFTER = 0.05


class BackendPool(Places):
    """Keep-alive connections to one backend, at most ``size`` of them open. ``secret``: the
    backend's key, which no response header passed on may carry."""

    def __init__(self, base_url: str, size: int, headers: dict[str, str] | None = None,
                 idle_timeout: float = IDLE_SECONDS, secret: str | None = None,
                 batch: WriteBatch | None = None) -> None:
        super().__init__(size, idle_timeout, (secret or "").encode("latin-1", "replace"), batch)
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        host_header = parts.netloc.rpartition("@")[2]
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in
                              {"Host": host_header, "Accept-Encoding": "identity",
                               **(headers or {})}.items())

    async def request(self, method: str, target: str, body: bytes = b"",
                      headers: str = "") -> Response:
        """Send a request and return its response once the headers are in.

        ``target`` is the path and query; ``headers`` are extra ``Name: value\\r\\n``
        lines. On cancellation while waiting, the connection is closed.
        """
        if method == "POST":
            headers += f"Content-Length: {len(body)}\r\n"
        elif method not in METHODS:
            raise ValueError(f"llama-server routes no {method} request")
        else:
            body = b""  # see the module's docstring: never a body llama-server would not read
        head = f"{method} {self.prefix}{target} HTTP/1.1\r\n{self._fixed}{headers}\r\n"
        data = head.encode("utf-8", "surrogateescape")
        if body:
            data += body
        is_head = method == "HEAD"
        conn = await self._acquire(fresh=False)
        retried = False
        while True:
            resp = Response(conn, is_head)
            conn.send(resp, data)
            try:
                while not resp._headers_done:
                    if resp._error is not None:
                        raise resp._error
                    await resp._arm()
            except BackendBroken:
                if resp._unsent and not retried:  # it never left: once, on a new connection
                    retried = True
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
                idle = now - conn.idle_since
                if idle < self.idle_timeout and conn.usable \
                        and (idle < LOOK_AFTER or not conn.dropped()):
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
