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

What a head may be, and the ``Gate`` every head passes before a byte of its body is read, are
gateway/edge/head.py's; the clocks (head deadline, stalls, write stalls) are
gateway/edge/sweep.py's.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any

import httptools

from gateway.edge import body as request_body
from gateway.edge import head
from gateway.edge.call import ALIASES, Call, Handler
from gateway.edge.sweep import LINGER

if TYPE_CHECKING:  # the server and its connections call each other on every request: named
    from gateway.edge.server import HttpServer  # concretely, mypyc calls them natively

log = logging.getLogger("llamagate.gateway.http")

class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer: Any = None
        self.closing = False  # close() was called or the client left: write nothing more
        self.closed_at = 0.0  # when close() was first called
        self.paused = False
        self.paused_since = 0.0  # when the transport last paused our writes
        self.receiving = False  # a request is partly in
        self.head_since = 0.0  # the first byte of the head now arriving (or its turn)
        self.counted = False  # counted against its client's connections (server.opened)
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
        self._head_bytes = 0  # the head's target, names and values, over callbacks
        self._in_head = False
        self._hosts = 0
        self._encoded = False  # a Content-Encoding header: the body is decoded when whole
        self._expect = False  # `Expect: 100-continue`: answered once the head passed
        self._waiting = False  # a head in, its turn (and gate) to come when the answer is out
        self._request: Call | None = None  # the request whose head is in, its body awaited
        self._has_body = False  # that request announced a body
        self._discard = False  # that request was refused at its head: its body is dropped
        self._gated: Call | None = None  # that request, let through by the gate
        self._refused = False

    @property
    def idle(self) -> bool:
        return self.task is None and not self.pending

    @property
    def in_head(self) -> bool:
        return self._in_head

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.peer = transport.get_extra_info("peername")
        if not self.server.opened(self):
            self.closing = True  # past its client's cap: closed at once, unanswered
            transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.counted:
            self.server.gone(self)
        if self.transport is not None:
            self.server.batch.drop(self.transport)
        self._release_gated()
        if self.task is not None and self.current is not None and not self.current._done:
            self.task.cancel()  # the client left: stop the backend's work for it
        self.pending.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))
        # what a partly received request holds, and the parser that refers back to us
        self.parser = head.DETACHED
        self._request = None
        self._url = []
        self._headers = []
        self._body = []

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
            if self._head > head.MAX_HEAD:
                self._refuse(431, "the request head is too large")

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.receiving = self._in_head = True
        self.head_since = time.monotonic()
        self._encoded = self._expect = self._discard = False
        self._hosts = 0
        self._url = []
        self._headers = []
        self._body = []
        self._size = 0
        self._head = 0
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._size += len(url)
        self._head_bytes += len(url)
        if self._size > head.MAX_LINE:
            self._refuse(414, "the request target is too long")
            raise httptools.HttpParserError("target too long")  # stops the parser

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never a request header (aiohttp ignored them too)
        self._headers.append((name, value))
        if len(name) == 4 and name.lower() == b"host":
            self._hosts += 1
        size = len(name) + len(value)
        self._head_bytes += size
        if size > head.MAX_LINE or len(self._headers) > head.MAX_HEADERS \
                or self._head_bytes > head.MAX_HEAD:
            self._refuse(431, "a request header field is too large, there are too many, "
                              "or the head is over 64 KiB")
            raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._size = 0
        problem = head.problem(self.parser.get_http_version(), self._hosts, self._url)
        if problem is not None:
            self._refuse(400, problem, whole_head=True)
            raise httptools.HttpParserError("refused at its head")  # stops the parser
        has_body = False
        for name, value in self._headers:  # names compared by length first: most are none
            if len(name) == 14 and name.lower() == b"content-length":
                if value.strip().isdigit():
                    length = int(value)
                    if length > self.server.max_body:
                        self._too_large()
                        return
                    has_body = length > 0
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                has_body = True
            elif len(name) == 6 and name.lower() == b"expect":
                self._expect = value.strip().lower() == b"100-continue"
            elif len(name) == 16 and name.lower() == b"content-encoding":
                self._encoded = True
        call = self._request = self._call(b"", keep_alive=False)
        self._has_body = has_body
        gate = self.server.gate
        if gate is None and not self._expect:
            return  # nothing to decide before its body
        if not self.idle:  # the answers before it go out first, and its gate waits for its turn
            self._waiting = True
            if gate is not None and self.transport is not None:
                self.transport.pause_reading()  # its body stays unread until then (_serve)
        elif not self._admit(call):
            raise httptools.HttpParserError("refused at its head")  # stops the parser

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body:
            self._too_large()
            raise httptools.HttpParserError("body too large")  # stops the parser
        if not self._discard:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.receiving = self._waiting = False
        call = self._request
        self._request = None
        if self._refused or call is None:
            return
        if call.denied is not None:  # refused at its head, its body dropped: the connection is kept
            call.keep_alive = self.parser.should_keep_alive()
            self._dispatch(call)
            return
        if self.parser.should_upgrade():
            # the parser stops at the head of an upgrade: a body would be lost, so such a
            # request is refused; one without is answered as a plain request, the last one
            if self._has_body:
                self._refuse(400, "protocol upgrades are not supported", whole_head=True)
                return
            self._gated = None  # handed over with what it was admitted with
            self._dispatch(call)
            return
        call.keep_alive = self.parser.should_keep_alive()
        call.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        if self._encoded:  # decoded (or refused) before anyone reads or forwards it
            request_body.decode_call(call, self.server.max_body)
        if self._gated is not None:
            if call.refusal is None:  # admitted at its head: not checked, nor charged, again
                self._gated = None
            else:
                self._release_gated()
        self._dispatch(call)

    def _admit(self, call: Call) -> bool:
        """The gate's word on the head now in, before its body is read: True when the body
        may come (`100 Continue` to a client that waits for it). A head refused for who
        sent it (401, 403, 429) with a body is answered now, the connection to close after
        it, its body never read (False). Any other refusal (404, 405), or one without a
        body, is answered once the request is whole, its body read and dropped, never
        buffered: the connection stays in step."""
        gate = self.server.gate
        if gate is not None:
            error = head.check(gate, call)
            if error is not None:
                call.refusal = (error.status, error.message)
                call.denied = error
                if not self._expect and (not self._has_body or error.status not in head.WHO):
                    self._discard = True
                    return True
                self._request = None
                self._refused = True
                self._dispatch(call)
                return False
            self._gated = call
        if self._expect and self.parser.get_http_version() == "1.1":
            self.write(head.CONTINUE)
        return True

    def _release_gated(self) -> None:
        gated = self._gated
        if gated is not None:
            self._gated = None
            gate = self.server.gate
            if gate is not None:
                gate.release(gated)
            gated.ticket = gated.route = None

    def _call(self, body: bytes, keep_alive: bool) -> Call:
        call = Call(self, self.parser.get_method().decode("latin-1"), head.origin_form(self._url),
                    head.headers_of(self._headers), self._headers, body, keep_alive,
                    self.parser.get_http_version() == "1.1")
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
        self._request = None
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
        # nothing is parsed after a refused request, so it is the last one: what the client
        # still sends (a body never read) is drained a moment, so that it sees the answer
        if self._refused and not self.pending and not self.closing and self.transport is not None:
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
            if self._in_head:  # a head begun while this was answered: its clock starts now
                self.head_since = self.idle_since
        if self.closing:
            return
        if self.pending:
            self._run(self.pending.popleft())
            if not self.pending and not self._waiting and self.transport is not None:
                self.transport.resume_reading()  # the last one waiting is answered now
        elif self._waiting:  # a head that came while this was answered: its turn
            self._waiting = False
            waiting = self._request
            if waiting is not None and self._admit(waiting) and self.transport is not None:
                self.transport.resume_reading()

    def stalled(self) -> None:
        """A partly received request sent nothing for the stall timeout, or its head was not
        whole within the head timeout."""
        self._refuse(408, "the rest of the request did not arrive in time",
                     whole_head=not self._in_head)

    def _refuse(self, status: int, message: str, whole_head: bool = False) -> None:
        """A request we cannot parse or accept: answered ``status`` by the handler in its turn,
        then the connection is closed (what follows cannot be trusted to be a request)."""
        if self._refused:
            return
        self._refused = True
        self._release_gated()
        self._request = None
        # a head read whole gives its method, path and id; of a broken one nothing is trusted
        call = self._call(b"", False) if whole_head else Call(self, "-", b"/", {}, [], b"", False)
        call.refusal = (status, message)
        self._dispatch(call)
