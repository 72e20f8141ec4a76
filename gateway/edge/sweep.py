"""The edge server's clocks (gateway/edge/server.py): one periodic pass over its
connections instead of a timer per connection per request (arming and cancelling one
cost every request on the hot path).

A connection is, at a pass:
- closing: cut off once its last bytes have had ``LINGER`` and a second to leave (the
  client stopped reading);
- with its writes paused (the client reads nothing) for the write-stall timeout: cut off
  (``abort``), which cancels its request and so frees its backend slot;
- answering (a task running, or requests waiting): left alone, however long it takes;
- in the middle of a request (head or body partly in) that sent nothing for the stall
  timeout, or with a head begun longer ago than the head timeout however it trickles (as
  nginx's client_header_timeout): answered 408 and closed (``HttpConnection.stalled``);
- between requests for the keep-alive timeout: closed, without a word (HTTP/1.1's way).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set
from dataclasses import dataclass
from typing import Protocol

# after a 413 the unread body is drained for this long, so the client sees the answer
# rather than a reset; then the connection is closed
LINGER = 2.0
# how long a partly received request may send nothing before it is answered 408. The
# clock restarts with every read, so a slow but steady upload is never cut, however
# long it takes (a limit on the whole request would cut a 10 MB body on a slow link);
# a dead or stuck client is. 60 s as nginx's client_header_timeout and
# client_body_timeout and Node's headersTimeout: TCP's retransmission backoff on a
# lossy link alone can hold bytes back for tens of seconds.
STALL_TIMEOUT = 60.0
# a whole head, from its first byte (HEAD_TIMEOUT), and a client's paused reading
# (WRITE_STALL_TIMEOUT): core/config.py's defaults
HEAD_TIMEOUT = 20.0
WRITE_STALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Clocks:
    """The server's timeouts, in seconds."""

    keepalive: float = 75.0
    stall: float = STALL_TIMEOUT
    head: float = HEAD_TIMEOUT
    write_stall: float = WRITE_STALL_TIMEOUT

    @property
    def period(self) -> float:
        """How often a pass runs: it bounds how late a clock fires, to half the shortest."""
        return min(5.0, self.keepalive / 2, self.stall / 2, self.head / 2, self.write_stall / 2)


class Swept(Protocol):
    """What a pass needs of a connection (gateway/edge/connection.py's HttpConnection)."""

    closing: bool
    closed_at: float  # when it began to close
    receiving: bool  # a request is partly in
    idle_since: float  # the last read, or the last answer sent
    head_since: float  # the first byte of the head now arriving, or the start of its turn
    paused: bool  # the client reads nothing: our writes wait
    paused_since: float

    @property
    def idle(self) -> bool: ...  # answering nothing, and nothing waiting

    @property
    def in_head(self) -> bool: ...  # the request partly in is still in its head

    def stalled(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


async def sweep(connections: Set[Swept], clocks: Clocks) -> None:
    """Run the passes over the server's ``connections`` until cancelled (``HttpServer.close``)."""
    while True:
        await asyncio.sleep(clocks.period)
        now = time.monotonic()
        for conn in list(connections):
            if conn.closing:
                if conn.closed_at < now - LINGER - 1:
                    conn.abort()  # closed, but its last bytes never left
            elif conn.paused and conn.paused_since < now - clocks.write_stall:
                conn.abort()  # the client stopped reading: its request is cancelled
            elif not conn.idle:
                continue  # answering: a pipelined request behind it waits for its turn
            elif conn.receiving:
                # idle_since is the time of the last read, or of the last answer sent
                # (a client may hold its body until a deferred `100 Continue`)
                if conn.idle_since < now - clocks.stall or (
                        conn.in_head and conn.head_since < now - clocks.head):
                    conn.stalled()
            elif conn.idle_since < now - clocks.keepalive:
                conn.close()
