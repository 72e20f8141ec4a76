"""Relays a backend SSE stream to the client as it arrives.

Each chunk read from the backend is written to the client at once: no
re-chunking, no waiting for event boundaries, no re-encoding. Only the last few
chunks are kept, by reference (for the final event's token counts, which TCP may
have split over several reads). A backend that dies mid stream ends the client's
stream with a final error event instead of a hang.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from gateway.backend_http import BackendBroken, Response
from gateway.errors import sse_error_event
from gateway.exchange import Exchange
from gateway.http_call import Call
from gateway.usage import tokens_from_stream

log = logging.getLogger("llamagate.gateway.sse")

# the final event (usage/timings) plus `[DONE]`, even if each arrived in pieces
_TAIL_CHUNKS = 4

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def relay(call: Call, upstream: Response, ex: Exchange) -> None:
    tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
    # the first event usually comes with the backend's head: one write, one wake-up
    first = await upstream.read_chunk() if upstream.has_data else b""
    call.start(upstream.status, SSE_HEADERS, first)
    head = first  # an Anthropic stream's input tokens are in its first event
    if first:
        ex.first_byte_at = time.monotonic()
        tail.append(first)
    while True:
        try:
            # everything that arrived since the last read, as one write
            chunk = await upstream.read_chunk()
        except BackendBroken as exc:
            log.warning("backend stream broke: %s", exc)
            ex.error = "backend_stream_error"
            await call.write(sse_error_event(
                "the backend stopped in the middle of the stream", "server_error",
                "backend_disconnected"))
            break
        if not chunk:
            ex.completed = True
            break
        if ex.first_byte_at is None:
            ex.first_byte_at = time.monotonic()
            head = chunk
        # a departed client raises ConnectionResetError here; the caller closes upstream
        await call.write(chunk)
        tail.append(chunk)
    ex.tokens = tokens_from_stream(head, b"".join(tail))
    call.finish()
