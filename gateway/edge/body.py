"""Request bodies sent compressed (``Content-Encoding: gzip`` or ``deflate``), decoded on the
edge server (gateway/edge/server.py) before anything reads them.

Validation, the handlers and the backend (gateway/upstream/backend.py forwards
the body and its Content-Type only) all see the plain body, so the header goes with the
coding. What a body may expand to is bounded by MAX_BODY_BYTES, as a plain body is: a
few KiB of gzip can inflate to gigabytes, so output is cut at the limit, never held whole.
Anything we cannot decode is the client's fault and refused (``Call.refusal``), by the
handler, like every other refusal.
"""

from __future__ import annotations

import zlib

from gateway.edge.call import Call

ACCEPTED = "gzip, deflate or identity"
_GZIP = 16 + zlib.MAX_WBITS  # a gzip wrapper
_ZLIB = zlib.MAX_WBITS  # RFC 9110's "deflate": zlib-wrapped
_RAW = -zlib.MAX_WBITS  # what some clients send as "deflate" instead: no wrapper
_MAX_MEMBERS = 16


class Refused(Exception):
    """The body cannot be taken: ``status`` and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_call(call: Call, limit: int) -> None:
    """Undo ``call``'s Content-Encoding in place, or set its refusal (400, or 413 past
    ``limit``); either way the header is gone from the call, so nothing forwards it."""
    encoding = b",".join(v for n, v in call.raw_headers if n.lower() == b"content-encoding")
    call.raw_headers = [(n, v) for n, v in call.raw_headers if n.lower() != b"content-encoding"]
    call.headers.pop("content-encoding", None)
    try:
        call.body = decode(call.body, encoding, limit)
    except Refused as exc:
        call.body = b""
        call.refusal = (exc.status, exc.message)  # the body was read whole: the connection
        # still frames requests, so it is kept


def decode(body: bytes, encoding: bytes, limit: int) -> bytes:
    """``body`` with the codings listed in ``encoding`` undone (the last applied first),
    at most ``limit`` bytes of it; raises ``Refused``."""
    if not body:
        return body  # nothing was sent (a GET that names a coding): nothing to decode
    codings = [c.strip().lower() for c in encoding.split(b",")]
    for coding in codings:  # all checked before any work is done
        if coding not in (b"gzip", b"x-gzip", b"deflate", b"identity", b""):
            name = coding.decode("latin-1")
            raise Refused(400, f"Content-Encoding '{name}' is not supported for request bodies; "
                               f"send the body with {ACCEPTED}")
    for coding in reversed(codings):
        if coding in (b"gzip", b"x-gzip"):
            body = _inflate(body, _GZIP, "gzip", limit)
        elif coding == b"deflate":
            body = _inflate(body, _ZLIB if _zlib_header(body) else _RAW, "deflate", limit)
    return body


def _zlib_header(data: bytes) -> bool:
    # RFC 1950: method 8 in the low nibble, and the two header bytes a multiple of 31
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, name: str, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    # gzip allows several members one after the other (gzip.decompress reads all), and a
    # client may send a few; each one copies what follows it (unused_data), so thousands of
    # empty ones would hold the event loop for minutes before the key is even checked
    for _ in range(_MAX_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        try:
            # one byte past the limit at most: enough to know it is over, and no more
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise Refused(400, f"the request body is not valid {name} data "
                               f"(Content-Encoding: {name}): {exc}") from None
        size += len(piece)
        if size > limit:
            raise Refused(413, f"request body is too large once decompressed "
                               f"(MAX_BODY_BYTES is {limit} bytes)")
        out.append(piece)
        if not inflater.eof:  # all input read and below the limit, yet the stream is open
            raise Refused(400, f"the request body is not valid {name} data "
                               f"(Content-Encoding: {name}): it ends early")
        data = inflater.unused_data
        if not data:
            return out[0] if len(out) == 1 else b"".join(out)
        if wbits != _GZIP:
            raise Refused(400, f"the request body is not valid {name} data "
                               f"(Content-Encoding: {name}): bytes follow its end")
    raise Refused(400, f"the request body has more than {_MAX_MEMBERS} gzip members")
