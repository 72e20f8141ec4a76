"""One request on the edge server and the means to answer it (gateway/edge/server.py).

An answer is either whole (``respond``: head and body in one write) or a stream
(``start``, ``write``..., ``finish``: chunked, or read-until-close for HTTP/1.0).
Every head carries the headers the server's ``decorate`` adds (request id, rate
limits, CORS: gateway/pipeline.py). Every header value is checked for CR, LF and NUL as
the head is serialized (``_lines``, ``_decorated``): one that would end its line early
(a backend's header passed through, a name a client chose) is dropped, never written.

A call names its connection's class for the type checker only (``TYPE_CHECKING``): at run
time this module imports nothing of the server's, so handlers that only take calls need not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from gateway.errors import GatewayError, error_body, error_for

if TYPE_CHECKING:  # a call and its connection call each other on every request: named
    from gateway.edge.connection import HttpConnection  # concretely, mypyc calls them natively

log = logging.getLogger("llamagate.gateway.http")

_REASONS = {s.value: s.phrase for s in HTTPStatus}
# paths without `/v1` that llama-server routes to the same handler as its `/v1` path (clients
# whose base URL lacks it): the edge server serves them as the `/v1` path, so auth,
# validation, limits and metrics agree. Not /completions and /embeddings: llama-server's are
# its native routes (gateway/upstream/llama_routes.py), answering in its own format
ALIASES = {"/chat/completions": "/v1/chat/completions", "/responses": "/v1/responses",
           "/models": "/v1/models"}

_date = ("", 0)


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    global _date
    now = int(time.time())
    if now != _date[1]:
        _date = (formatdate(now, usegmt=True), now)
    return _date[0]


class Call:
    """One request and the means to answer it: a whole body, or a chunked stream."""

    __slots__ = ("body", "conn", "ex", "headers", "http11", "key", "keep_alive", "method", "params", "path",
                 "query", "raw_headers", "refusal", "route", "state", "status", "target",
                 "ticket", "too_large", "denied", "_done")

    def __init__(self, conn: HttpConnection, method: str, target: bytes, headers: dict[str, str],
                 raw_headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool,
                 http11: bool = True) -> None:
        self.conn = conn
        self.method = method
        self.http11 = http11  # else HTTP/1.0: no chunked answers, keep-alive only on request
        self.target = target
        raw_path, _, query = target.partition(b"?")
        path = raw_path.decode("latin-1")
        self.path = unquote(path, errors="surrogateescape") if "%" in path else path
        self.query = query.decode("latin-1")
        self.headers = headers  # names in lower case; a repeated header: its first value
        self.raw_headers = raw_headers
        self.body = body
        self.keep_alive = keep_alive
        self.status = 0  # once the head is sent
        self.ex: Any = None  # what the handler keeps per request (gateway/pipeline.py)
        self.key: Any = None
        self.ticket: Any = None
        self.params: Mapping[str, str] = {}  # a route template's segments (gateway/router.py)
        # the route its head was admitted to by the server's gate (gateway/pipeline.py), with
        # ``key`` and ``ticket``: the pipeline does not match, check nor charge it again
        self.route: Any = None
        self.state: Any = conn.server.state
        self.too_large = False  # the body was over MAX_BODY_BYTES and was not read
        # not a request we accept (a 413 too): status, why; the handler answers it
        self.refusal: tuple[int, str] | None = None
        # refused at its head, before its body was read (`Expect: 100-continue`, the server's
        # gate): the error it is answered with; ``refusal`` is set too
        self.denied: GatewayError | None = None
        self._done = False

    @property
    def remote(self) -> str | None:
        peer = self.conn.peer
        return peer[0] if isinstance(peer, tuple) else None

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def started(self) -> bool:
        return self.status != 0

    def respond(self, status: int, body: bytes, content_type: str | None = "application/json",
                headers: Mapping[str, str] | None = None) -> None:
        """The whole answer, in one write."""
        extra = _content_type(content_type) if content_type else ""
        if headers:
            extra += _lines(headers)
        if status in (204, 304):  # never a body, so no length either
            body = b""
        else:
            extra += f"Content-Length: {len(body)}\r\n"
        head = self._head(status, extra)
        self._done = True
        self.conn.write(head + body if self.method != "HEAD" else head)
        self.conn.finished(self)

    def start(self, status: int, headers: Mapping[str, str], first: bytes = b"") -> None:
        """Begin a streamed answer (chunked; a HTTP/1.0 client reads until close), with
        its ``first`` piece in the same write when it is already at hand."""
        extra = _lines(headers)
        if self.http11:
            extra += "Transfer-Encoding: chunked\r\n"
        else:
            self.keep_alive = False
        head = self._head(status, extra)
        self.conn.write(head + self.frame(first) if first else head)

    def frame(self, data: bytes) -> bytes:
        """``data`` as one piece of a streamed answer, as the wire carries it."""
        if not data:
            return b""  # an empty chunk would end the stream
        return b"%x\r\n%b\r\n" % (len(data), data) if self.http11 else data

    async def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.closing:
            raise ConnectionResetError("the client closed the connection")
        if data:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self.http11 else data)
        if conn.paused:
            await conn.drain()

    def finish(self) -> None:
        """End a streamed answer."""
        if self._done:
            return
        self._done = True
        if self.http11:
            self.conn.write(b"0\r\n\r\n")
        self.conn.finished(self)

    def _head(self, status: int, extra: str) -> bytes:
        self.status = status
        server = self.conn.server
        if not self.keep_alive or server.closing:
            conn = "Connection: close\r\n"
        else:  # HTTP/1.1 keeps the connection unless told; a 1.0 client must be told it is kept
            conn = "" if self.http11 else "Connection: keep-alive\r\n"
        return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Date: {http_date()}\r\nServer: llamagate\r\n{extra}{conn}"
                f"{_decorated(server.decorate(self))}\r\n").encode("latin-1")

    def abandon(self) -> None:
        """The handler ended without finishing its answer: the connection cannot be reused."""
        if self._done:
            return
        self._done = True
        if not self.started and not self.conn.closing:
            self.keep_alive = False
            self.respond(500, error_body("internal gateway error", "server_error", "internal_error"))
            return
        self.conn.close()


def _lines(headers: Mapping[str, str]) -> str:
    """``headers`` as header lines, without any whose name or value holds CR, LF or NUL."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    # each line ends with the one CR LF written here: counted once, not searched per value
    n = len(headers)
    if lines.count("\n") == n and lines.count("\r") == n and "\x00" not in lines:
        return lines
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items() if _safe(k, v))


def _content_type(value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        return _lines({"Content-Type": value})  # dropped, with its warning
    return f"Content-Type: {value}\r\n"


def _safe(name: str, value: str) -> bool:
    if any(c in name or c in value for c in ("\r", "\n", "\x00")):
        log.warning("dropped the header %r: its name or value holds a CR, LF or NUL",
                    "".join(c for c in name[:64] if c.isprintable()))
        return False
    return True


def _decorated(lines: str) -> str:
    """The decorator's header lines, without a broken one (with a bare CR or LF, or a NUL)."""
    if "\x00" not in lines and lines.count("\r\n") == lines.count("\n") == lines.count("\r"):
        return lines
    parts = lines.split("\r\n")
    kept = [p for p in parts if p and "\r" not in p and "\n" not in p and "\x00" not in p]
    log.warning("dropped %d header line(s) holding a bare CR or LF, or a NUL",
                len([p for p in parts if p]) - len(kept))
    return "".join(f"{p}\r\n" for p in kept)


def refusal_error(refusal: tuple[int, str]) -> GatewayError:
    """The error a refused request (``Call.refusal``) is answered with, by the handler."""
    status, message = refusal
    return error_for(status, message)  # 400, 408, 413, 414 or 431: typed by gateway/errors.py


Handler = Callable[[Call], Awaitable[None]]
