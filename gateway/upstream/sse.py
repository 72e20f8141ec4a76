"""Relays a backend SSE stream to the client as it arrives.

Each chunk read from the backend is written to the client at once, up to its
last whole event: no waiting for the next event, no re-encoding. The unfinished
end of an event that TCP split is held back until the rest of it arrives (a client
acts on an event only at its blank line, so this delays nothing), so that a stream
cut short (its timeout, shutdown, the backend dying) ends with an error event of its
own rather than one glued to half an event, which clients fail to parse. Only the
last few chunks are kept, by reference, for the final event's token counts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping

from gateway.edge.call import Call
from gateway.errors import BadGateway, sse_error_event
from gateway.exchange import Exchange
from gateway.observe.metering import ChoiceTally, finish_reason, tokens_from_stream
from gateway.upstream.client import BackendBroken, Response
from gateway.upstream.cut import MARKERS, token_events
from gateway.upstream.events import boundary

log = logging.getLogger("llamagate.gateway.sse")

# the final event (usage/timings) plus `[DONE]`, even if each arrived in pieces
_TAIL_CHUNKS = 4
# an unfinished event longer than this is passed on as it is (an upstream whose events
# end otherwise than with a blank line must not be buffered whole)
_HOLD_MAX = 1 << 16

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_OURS = frozenset(name.lower() for name in SSE_HEADERS)


def _headers(upstream: Response) -> Mapping[str, str]:
    """The stream's head: the backend's end-to-end headers, and ours (which win)."""
    passed = upstream.headers
    if passed is None:
        return SSE_HEADERS
    return {**{k: v for k, v in passed.items() if k.lower() not in _OURS}, **SSE_HEADERS}


def split(data: bytes) -> tuple[bytes, bytes]:
    """``data`` as (its whole events, the unfinished end of one to hold back)."""
    end = boundary(data)
    if end == len(data) or len(data) - end > _HOLD_MAX:
        return data, b""
    return data[:end], data[end:]


async def relay(call: Call, upstream: Response, ex: Exchange) -> None:
    tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
    # several tasks (n > 1, several prompts) end with a final event each, not all in the tail
    tally = ChoiceTally(ex.n) if ex.tasks > 1 else None
    # token events relayed: what a stream cut short is charged (gateway/upstream/cut.py)
    marker = MARKERS.get(call.path)
    # the first event usually comes with the backend's head: one write, one wake-up
    first = await upstream.read_chunk() if upstream.has_data else b""
    head = first  # an Anthropic stream's input tokens are in its first event
    first, held = split(first)
    call.start(upstream.status, _headers(upstream), first)
    if head:
        ex.first_byte_at = time.monotonic()
        ex.head = head
        tail.append(first)
        if tally is not None:
            tally.feed(first)
        if marker is not None:
            ex.generated += token_events(first, marker)
    while True:
        try:
            # everything that arrived since the last read, as one write
            chunk = await upstream.read_chunk()
        except BackendBroken as exc:
            log.warning("backend stream broke: %s", exc)
            ex.error, ex.end = "backend_stream_error", "backend_failed"
            ex.upstream_failure = "broken"  # a pool's upstream: counts toward its ejection
            await call.write(sse_error_event(BadGateway(
                "the backend stopped in the middle of the stream", code="backend_disconnected")))
            break
        if not chunk:
            ex.completed = True
            if held:  # the stream ended without a blank line after its last event
                await call.write(held)
                tail.append(held)
                if tally is not None:
                    tally.feed(held)
            break
        if ex.first_byte_at is None:
            ex.first_byte_at = time.monotonic()
            head = ex.head = chunk
        if held or boundary(chunk) != len(chunk):
            chunk, held = split(held + chunk)
            if not chunk:
                continue
        # a departed client raises ConnectionResetError here; the caller closes upstream
        await call.write(chunk)
        tail.append(chunk)
        if tally is not None:
            tally.feed(chunk)
        if marker is not None:
            ex.generated += token_events(chunk, marker)
    if tally is not None:  # a broken stream's tally lacks tasks: the reservation is the charge
        tally.end()
        ex.tokens = tally.result() if ex.completed else None
    else:
        ended = b"".join(tail)
        ex.tokens = tokens_from_stream(head, ended)
        ex.finish = finish_reason(ended)
    call.finish()
