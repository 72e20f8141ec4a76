"""What a request head may be, and the gate it passes before its body is read.

Every head passes the ``Gate`` given to the server (gateway/pipeline.py: route, key, scope,
rate limit) before a byte of its body is read: a head refused for who sent it (401, 403,
429) with a body is answered at once and the connection closed after a short drain
(``LINGER``), the body never buffered nor decoded; another refusal (404, 405), or one
without a body, is answered in its turn, its body read and dropped, the connection kept. A
head that passed carries what it was admitted with (key, ticket, route) to the pipeline,
which does not check it again. `Expect: 100-continue` is answered once the head passed. A
head that arrives while an answer is being made waits, unread beyond what came with it,
until its turn: its key's concurrency is counted only then.

Limits: a head is at most ``MAX_HEAD`` bytes (request target, header names and values,
counted across reads and across parser callbacks: 431), one `Host` header and an origin-form
or absolute target (``*`` is 400: ``problem``). ``Gate`` is what the pipeline gives the
server (gateway/pipeline.py's HeadGate: route, key, scope, rate limit); the connection
(gateway/edge/connection.py) asks it for every head.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Protocol

import httptools

from gateway.edge.call import Call
from gateway.errors import GatewayError

log = logging.getLogger("llamagate.gateway.http")

# the request line and each header field (aiohttp's limits), the number of header fields,
# and all of a head: past them, 414/431 before anything is buffered without bound
MAX_LINE: Final = 8190
MAX_HEADERS: Final = 128
MAX_HEAD: Final = 64 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# refusals of who is asking, not of what is asked: such a client's body is never read
WHO: Final = frozenset({401, 403, 429})


class _Detached:
    """What a closed connection's parser calls back: nothing (see ``DETACHED``)."""


# a closed connection's parser: the one it had referred back to it, so the two made a cycle
# that only the cycle collector freed, body and all (issue 21: 9 MiB per connection held,
# with gateway/worker.py's raised GC threshold)
DETACHED = httptools.HttpRequestParser(_Detached())


class Gate(Protocol):
    """The checks a head alone decides, made before a client is told `100 Continue`."""

    def check(self, call: Call) -> GatewayError | None:
        """The error ``call`` (a head, no body yet) is refused with; None when it may go on,
        with what it was admitted with kept on the call (key, ticket, route)."""

    def release(self, call: Call) -> None:
        """``call`` passed ``check`` but its body never came whole: give back what it took."""


def problem(version: str, hosts: int, url: list[bytes]) -> str | None:
    """Why a head is not a request we serve (400), or None: its HTTP version (llhttp also
    reads 0.9 and 2.0 request lines), its count of `Host` headers, its target (``url``: the
    target's pieces as the parser gave them)."""
    if version not in ("1.0", "1.1"):
        return f"HTTP/{version} is not served here: use HTTP/1.1"
    if hosts != 1 and (hosts or version == "1.1"):
        # RFC 9112 3.2: two are a request to refuse, whatever the version
        return "an HTTP/1.1 request needs a Host header" if not hosts else \
            "a request has one Host header"
    if url and url[0][:1] == b"*":  # OPTIONS *: nothing here serves it
        return "the request target * is not served here"
    return None


def headers_of(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Names in lower case; the first value wins for a repeated header, as aiohttp's gave."""
    return {n.decode("latin-1").lower(): v.decode("latin-1").strip() for n, v in reversed(raw)}


def origin_form(url: list[bytes]) -> bytes:
    """The request target as path and query (an absolute one, as sent to a proxy, cut down)."""
    target = b"".join(url)
    if not target.startswith(b"/"):
        # Any: the stub types path and query bytes, but a part the target lacks is None,
        # and compiled (gateway/native.py) that mismatch would raise
        parsed: Any = httptools.parse_url(target)
        target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
    return target


def check(gate: Gate, call: Call) -> GatewayError | None:
    """``gate.check``, and a bug in it logged, nothing kept: the pipeline meets it again."""
    try:
        return gate.check(call)
    except Exception:  # a bug in a check: nothing kept; the pipeline meets it again, and says 500
        log.exception("the head gate failed")
        call.key = call.ticket = call.route = None
        return None
