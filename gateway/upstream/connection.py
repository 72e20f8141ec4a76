"""One keep-alive connection to the backend, the response it carries, and the pool's
bookkeeping the connection updates (``Places``; the pool that builds on it is
gateway/upstream/client.py, with the contract the proxy relies on). The connection is an
asyncio Protocol; httptools parses each read in one pass and hands body bytes to the
response as they arrive.

A response's headers are kept as the client will get them: 1xx heads are skipped for
the final one, and what must not cross the gateway is left out (see ``_DROPPED``).
"""

from __future__ import annotations

import asyncio
import collections
import select
import socket
import time
from typing import Any, Final, cast

import httptools

from gateway.edge.write_batch import WriteBatch

# body bytes of an unread stream buffered here before reading from the backend pauses
_PAUSE_AT: Final = 1 << 18
# response headers not passed on (lower case): the hop-by-hop ones (RFC 9110 7.6.1; also
# those a Connection header names), the framing and identity the gateway writes itself (it
# re-frames every answer; Content-Type is passed on as its own field), and the backend's
# challenge for the gateway's own credentials (a 401 from it is the operator's to fix)
_TYPE: Final = 1
_FRAMING: Final = 2
_CONNECTION: Final = 3
_OTHER: Final = 0
_DROPPED: Final[dict[bytes, int]] = {
    b"content-type": _TYPE, b"content-length": _FRAMING, b"transfer-encoding": _FRAMING,
    b"connection": _CONNECTION,
    **dict.fromkeys([b"keep-alive", b"te", b"trailer", b"upgrade", b"date", b"server",
                     b"x-request-id", b"x-model-fallback", b"www-authenticate",
                     b"authorization"], _OTHER)}
# and the header families the gateway's own stages write: proxies', CORS, rate limits
_DROPPED_PREFIXES: Final = (b"proxy-", b"access-control-", b"x-ratelimit-")
# Connection options that name no header
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive"})


class BackendError(Exception):
    pass


class BackendConnectError(BackendError):
    pass


class BackendBroken(BackendError):
    pass


class Places:
    """What a pool's connections update as they go idle or close: the idle ones, how many are
    open (each holds one of ``size`` places) and the requests waiting for a place."""

    def __init__(self, size: int, idle_timeout: float, secret: bytes,
                 batch: WriteBatch | None = None) -> None:
        self.size = size
        self.idle_timeout = idle_timeout  # seconds a connection may idle and still be reused
        self.secret = secret  # the backend's key: a response header carrying it is dropped
        # requests sent while the loop is busy go out together; a pool's upstreams share one
        # (a batch each sent the first write of every pass at once, waking each upstream)
        self.batch = WriteBatch() if batch is None else batch
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

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


class Response:
    """One backend response; ``status``, ``content_type`` and ``headers`` (those passed on to
    the client, None when there are none) are set when it is returned."""

    __slots__ = ("_chunks", "_conn", "_early", "_error", "_framed", "_head", "_headers_done", "_hop",
                 "_read_all", "_size", "_unsent", "_waiter", "complete", "content_type", "headers",
                 "keep_alive", "status")

    def __init__(self, conn: Connection, head: bool) -> None:
        self._conn: Connection | None = conn
        self._head = head  # a HEAD request: the answer has no body, whatever its headers say
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BackendBroken | None = None
        self._headers_done = False
        self._unsent = False  # the request provably never left: it may be sent again
        self._early = False  # the answer began before the request was fully sent
        self._hop: list[bytes] | None = None  # headers the Connection header names
        self._framed = False  # Content-Length or chunked; otherwise the body ends at EOF
        self._read_all = False
        self.status = 0
        self.content_type = ""
        self.headers: dict[str, str] | None = None
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

    @property
    def has_data(self) -> bool:
        """Body bytes have arrived that ``read_chunk`` would return at once."""
        return bool(self._chunks)

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


class Connection(asyncio.Protocol):
    """One keep-alive connection; it parses the response of the request it carries."""

    def __init__(self, pool: Places) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.counted = True  # holds one of the pool's places
        self.idle_since = 0.0
        self.paused = False
        self.poller: Any = None  # select.poll on the socket, for ``dropped``

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:  # made once: each reuse is one poll(2), nothing more
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # nothing may arrive unasked on an idle connection
            self.close()
            return
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
        self.pool.forget(self)
        if self.transport is not None:
            self.pool.batch.drop(self.transport)
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
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            # answered before it read the whole request (a refusal of its head): the rest,
            # still going out, would be parsed by the backend as the next request. The write
            # batch holds nothing here: it is flushed in the loop pass before any read.
            resp._early = True

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        assert resp is not None
        lower = name.lower()
        # one lookup for the headers every answer has (a chain of tests per header cost the
        # request path 5,000 instructions under callgrind)
        kind = _DROPPED.get(lower)
        if kind is not None:
            if kind == _TYPE:
                resp.content_type = value.decode("latin-1")
            elif kind == _FRAMING:
                resp._framed = True
            elif kind == _CONNECTION:
                options = value.lower()
                if options != b"keep-alive" and options != b"close":  # else it names nothing
                    named = [o for o in options.replace(b" ", b"").split(b",")
                             if o and o not in _CONNECTION_OPTIONS]
                    if named:
                        resp._hop = named if resp._hop is None else resp._hop + named
            return
        if lower.startswith(_DROPPED_PREFIXES):
            return
        secret = self.pool.secret
        if secret and secret in value:
            return
        headers = resp.headers
        key, text = name.decode("latin-1"), value.decode("latin-1")
        if headers is None:
            resp.headers = {key: text}
        elif key in headers:
            # the write API takes one value a name: a repeated field joins as a list
            headers[key] += ", " + text
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:  # no request here asks to switch protocols
                raise BackendBroken("the backend switched protocols unasked")
            # an interim answer (100 Continue, 103 Early Hints): the final one follows
            resp.content_type, resp.headers, resp._hop, resp._framed = "", None, None, False
            return
        resp.status = status
        # llama-server (cpp-httplib) closes the connection after every streamed answer,
        # though its head says keep-alive: reused, the next request would go out on a
        # closing connection, and a sent request is never sent again
        resp.keep_alive = self.parser.should_keep_alive() and not resp._early \
            and not resp.content_type.startswith("text/event-stream")
        resp._headers_done = True
        if resp._hop is not None and resp.headers is not None:
            for name in [k for k in resp.headers if k.lower().encode("latin-1") in resp._hop]:
                del resp.headers[name]
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
        if resp._headers_done:  # else the end of an interim answer
            resp.complete = True

    # -- the pool's side -------------------------------------------------------------
    def send(self, resp: Response, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.resp = resp
        if transport.is_closing():  # closed by the backend; connection_lost is on its way
            resp._unsent = True
            resp._fail("the backend connection broke (closed by the backend)")
            return
        self.pool.batch.write(transport, data)
        if transport.is_closing():
            # the write failed at once (a write the batch holds has not been tried): the
            # transport had nothing left to send before it, so no byte of this one left
            resp._unsent = True

    @property
    def usable(self) -> bool:
        return self.counted and self.transport is not None and not self.transport.is_closing()

    def dropped(self) -> bool:
        """An idle connection the backend has closed (or written to) that the loop has not
        seen yet: its socket is readable. One poll, no wait: the close that cpp-httplib
        sends as the request goes out is then found before it, not after (urllib3 checks
        the same way before it reuses a connection)."""
        poller = self.poller
        return poller is not None and bool(poller.poll(0))

    def _finish(self, resp: Response) -> None:
        self.resp = None
        resp._conn = None
        if resp.keep_alive and self.counted:
            if self.paused:
                self.resume()
            self.pool.put(self)
        else:
            self.close()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        transport = self.transport
        if transport is not None:
            self.pool.batch.drop(transport)  # a request not sent yet never starts
            if transport.get_write_buffer_size():
                transport.abort()  # what is left of a request must not go out after all
            else:
                transport.close()
        self.pool.forget(self)
