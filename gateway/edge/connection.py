"""One client connection of the gateway's HTTP/1.1 server: the asyncio protocol, parsed by
httptools, answered in as few writes as possible (gateway/edge/server.py owns the
listening socket and every connection; this is what one of them does).

Per connection, requests are answered one at a time in order (pipelined ones wait
in ``pending``). Each request runs in its own task, which is cancelled when the client
goes away: that is what stops backend work for a departed client. While a whole request
waits its turn the connection is not read (as uvicorn does): a pipelining client gets
one request held beyond the one being answered (and what one read brought with it), not
as many bodies of MAX_BODY_BYTES as it cares to send. An alias path (``ALIASES``:
`/chat/completions` for `/v1/chat/completions`) is rewritten to its `/v1` path as the
request is made.

`Expect: 100-continue` is answered once the head passed the ``Gate`` given to the server
(gateway/pipeline.py: route, key, scope, rate limit): a client it refuses gets its error
before it uploads a byte, and the connection is closed with the body unread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import httptools

from gateway.edge import body as request_body
from gateway.edge.call import ALIASES, Call, Handler
from gateway.edge.sweep import LINGER
from gateway.edge.write_batch import WriteBatch
from gateway.errors import GatewayError

log = logging.getLogger("llamagate.gateway.http")

# the request line and each header field (aiohttp's limits), the number of header fields,
# and all of a head: past them, 414/431 before anything is buffered without bound
MAX_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Gate(Protocol):
    """The checks a head alone decides, made before a client is told `100 Continue`."""

    def check(self, call: Call) -> GatewayError | None:
        """The error ``call`` (a head, no body yet) is refused with; None when it may go on,
        with what it was admitted with kept on the call (key, ticket)."""

    def release(self, call: Call) -> None:
        """``call`` passed ``check`` but its body never came whole: give back what it took."""


class Listener(Protocol):
    """What a connection needs of its server (gateway/edge/server.py's HttpServer)."""

    state: Any
    handler: Handler
    decorate: Callable[[Call], str]
    max_body: int
    gate: Gate | None
    connections: set[HttpConnection]
    batch: WriteBatch
    closing: bool


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: Listener) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer: Any = None
        self.closing = False  # close() was called or the client left: write nothing more
        self.closed_at = 0.0  # when close() was first called
        self.paused = False
        self.receiving = False  # a request is partly in
        self.task: asyncio.Task[None] | None = None
        self.current: Call | None = None
        self.pending: collections.deque[Call] = collections.deque()
        self.idle_since = time.monotonic()
        self._drain: asyncio.Future[None] | None = None
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._head = 0  # bytes received while a head was incomplete
        self._in_head = False
        self._host = False
        self._encoded = False  # a Content-Encoding header: the body is decoded when whole
        self._continue = False  # `Expect: 100-continue` to answer when the request's turn comes
        self._gated: Call | None = None  # the head the gate let through, its body awaited
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
        self.closing = True
        self.server.connections.discard(self)
        if self.transport is not None:
            self.server.batch.drop(self.transport)
        self._release_gated()
        if self.task is not None and self.current is not None and not self.current._done:
            self.task.cancel()  # the client left: stop the backend's work for it
        self.pending.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.idle_since = time.monotonic()  # a slow upload is not an idle connection
        if self._refused:
            return  # after a 413 or a broken request: drained, never parsed
        was_in_head = self._in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")  # answered, then closed
            return
        except httptools.HttpParserError:
            self._refuse(400, "malformed HTTP request")
            return
        # a head still incomplete after a whole read: bound what the parser buffers for it
        # (a read that completes a head is not counted: the rest of it may be body)
        if was_in_head and self._in_head:
            self._head += len(data)
            if self._head > MAX_HEAD:
                self._refuse(431, "the request head is too large")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.receiving = self._in_head = True
        self._host = self._encoded = False
        self._url = []
        self._headers = []
        self._body = []
        self._size = 0
        self._head = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._size += len(url)
        if self._size > MAX_LINE:
            self._refuse(414, "the request target is too long")
            raise httptools.HttpParserError("target too long")  # stops the parser

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never a request header (aiohttp ignored them too)
        self._headers.append((name, value))
        if len(name) == 4 and name.lower() == b"host":
            self._host = True
        if len(name) + len(value) > MAX_LINE or len(self._headers) > MAX_HEADERS:
            self._refuse(431, "a request header field is too large, or there are too many")
            raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._size = 0
        expect = False
        for name, value in self._headers:  # names compared by length first: most are neither
            if len(name) == 14 and name.lower() == b"content-length":
                if value.strip().isdigit() and int(value) > self.server.max_body:
                    self._too_large()
                    return
            elif len(name) == 6 and name.lower() == b"expect":
                expect = value.strip().lower() == b"100-continue"
            elif len(name) == 16 and name.lower() == b"content-encoding":
                self._encoded = True
        if expect and self.parser.get_http_version() == "1.1":
            if not self.idle:  # the answers before it must go out first
                self._continue = True
            elif not self._go_on():
                raise httptools.HttpParserError("refused at its head")  # stops the parser

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body:
            self._too_large()
            raise httptools.HttpParserError("body too large")  # stops the parser
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.receiving = self._continue = False
        if self._refused:
            return
        version = self.parser.get_http_version()  # llhttp also reads 0.9 and 2.0 request lines
        if version not in ("1.0", "1.1") or (version == "1.1" and not self._host):
            self._refuse(400, "an HTTP/1.1 request needs a Host header" if version == "1.1" else
                         f"HTTP/{version} is not served here: use HTTP/1.1", whole_head=True)
            return
        if self.parser.should_upgrade():
            # the parser stops at the head of an upgrade: a body would be lost, so such a
            # request is refused; one without is answered as a plain request, the last one
            if any(n.lower() in (b"content-length", b"transfer-encoding") and v.strip() != b"0"
                   for n, v in self._headers):
                self._refuse(400, "protocol upgrades are not supported", whole_head=True)
                return
            self._dispatch(self._call(b"", keep_alive=False))
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        call = self._call(body, self.parser.should_keep_alive())
        if self._encoded:  # decoded (or refused) before anyone reads or forwards it
            request_body.decode_call(call, self.server.max_body)
        gated = self._gated
        if gated is not None:
            if call.refusal is None:  # admitted at its head: not checked, nor charged, again
                self._gated = None
                call.key, call.ticket = gated.key, gated.ticket
            else:
                self._release_gated()
        self._dispatch(call)

    def _go_on(self) -> bool:
        """`100 Continue` for the head now in, once it passed the gate; else its refusal is
        answered, the connection to close after it, its body never read (False)."""
        gate = self.server.gate
        if gate is not None:
            call = self._call(b"", keep_alive=False)
            error = gate.check(call)
            if error is not None:
                self._refused = True
                call.refusal = (error.status, error.message)
                call.denied = error
                self._dispatch(call)
                return False
            self._gated = call
        self.write(CONTINUE)
        return True

    def _release_gated(self) -> None:
        gated = self._gated
        if gated is not None:
            self._gated = None
            gate = self.server.gate
            if gate is not None:
                gate.release(gated)

    def _call(self, body: bytes, keep_alive: bool) -> Call:
        # first value wins for a repeated header, as aiohttp's headers.get() gave
        headers = {n.decode("latin-1").lower(): v.decode("latin-1").strip()
                   for n, v in reversed(self._headers)}
        target = b"".join(self._url)
        if not target.startswith(b"/"):  # absolute form, as sent to a proxy
            # Any: the stub types path and query bytes, but a part the target lacks is None,
            # and compiled (gateway/native.py) that mismatch would raise
            url: Any = httptools.parse_url(target)
            target = (url.path or b"/") + (b"?" + url.query if url.query else b"")
        call = Call(self, self.parser.get_method().decode("latin-1"), target, headers, self._headers,
                    body, keep_alive, self.parser.get_http_version() == "1.1")
        if not call.path.startswith("/v1/"):  # off the `/v1/` path: its cost is not the hot path's
            alias = ALIASES.get(call.path)
            if alias is not None:
                call.path = alias
        return call

    def _too_large(self) -> None:
        """Answered 413 by the handler (logged, counted); the unread body is drained a moment,
        then the connection closed (``finished``)."""
        if self._refused:
            return
        self._refused = True
        self._release_gated()
        call = self._call(b"", keep_alive=False)
        call.too_large = True
        call.refusal = (413, "request body is too large (MAX_BODY_BYTES)")
        self._dispatch(call)

    def _dispatch(self, call: Call) -> None:
        if self.task is None:
            self._run(call)
        else:
            self.pending.append(call)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()  # until the queue is empty again (_serve)

    # answering

    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.server.batch.write(self.transport, data)

    async def drain(self) -> None:
        if self.closing:
            raise ConnectionResetError("the client closed the connection")
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    def finished(self, call: Call) -> None:
        """``call``'s answer is all written: close now if it was the last one."""
        if (call.too_large or call.denied is not None) and not self.closing \
                and self.transport is not None:
            self._linger()
        elif not call.keep_alive or self.server.closing:
            self.close()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.closed_at = time.monotonic()
        if self.transport is not None:
            self.server.batch.flush(self.transport)
            if not self.transport.is_closing():
                self.transport.close()  # flushes what is buffered first

    def abort(self) -> None:
        """Cut the connection now, unsent bytes and all (a client that stopped reading)."""
        self.close()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the connection was cut off"))
        if self.transport is not None:
            self.transport.abort()

    def _linger(self) -> None:
        assert self.transport is not None
        self.closing = True
        self.closed_at = time.monotonic()
        if self.transport.can_write_eof():
            self.server.batch.flush(self.transport)
            self.transport.write_eof()  # the client sees the end of the answer and may close
        asyncio.get_running_loop().call_later(LINGER, self.close)

    def _run(self, call: Call) -> None:
        answer = self.server.handler
        self.current = call
        # a fresh context: nothing (a request id) carries over from the previous request
        self.task = asyncio.get_running_loop().create_task(self._serve(call, answer),
                                                           context=contextvars.Context())

    async def _serve(self, call: Call, answer: Handler) -> None:
        try:
            await answer(call)
        except (asyncio.CancelledError, ConnectionError):
            pass  # the client left, or shutdown ended the request
        except Exception:  # the handler renders its own errors; this is a bug
            log.exception("unhandled error answering a request")
        finally:
            call.abandon()
            self.task = self.current = None
            self.idle_since = time.monotonic()
        if self.closing:
            return
        if self.pending:
            self._run(self.pending.popleft())
            if not self.pending and self.transport is not None:
                self.transport.resume_reading()  # the last one waiting is answered now
        elif self._continue:
            self._continue = False
            self._go_on()

    def stalled(self) -> None:
        """Nothing more of a partly received request came for the stall timeout."""
        self._refuse(408, "the rest of the request did not arrive in time",
                     whole_head=not self._in_head)

    def _refuse(self, status: int, message: str, whole_head: bool = False) -> None:
        """A request we cannot parse or accept: answered ``status`` by the handler in its turn,
        then the connection is closed (what follows cannot be trusted to be a request)."""
        if self._refused:
            return
        self._refused = True
        self._release_gated()
        # a head read whole gives its method, path and id; of a broken one nothing is trusted
        call = self._call(b"", False) if whole_head else Call(self, "-", b"/", {}, [], b"", False)
        call.refusal = (status, message)
        self._dispatch(call)
