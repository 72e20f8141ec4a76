"""The edge server's clocks (gateway/edge/server.py): one periodic pass over its
connections instead of a timer per connection per request (arming and cancelling one
cost every request on the hot path).

A connection is, at a pass:
- closing: cut off once its last bytes have had ``LINGER`` and a second to leave (the
  client stopped reading);
- answering (a task running, or requests waiting): left alone, however long it takes;
- in the middle of a request (head or body partly in) that sent nothing for the stall
  timeout: answered 408 and closed (``HttpConnection.stalled``);
- between requests for the keep-alive timeout: closed, without a word (HTTP/1.1's way).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set
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


class Swept(Protocol):
    """What a pass needs of a connection (gateway/edge/connection.py's HttpConnection)."""

    closing: bool
    closed_at: float  # when it began to close
    receiving: bool  # a request is partly in
    idle_since: float  # the last read, or the last answer sent

    @property
    def idle(self) -> bool: ...  # answering nothing, and nothing waiting

    def stalled(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


async def sweep(connections: Set[Swept], keepalive_timeout: float, stall_timeout: float) -> None:
    """Run the passes over the server's ``connections`` until cancelled (``HttpServer.close``)."""
    while True:
        # the pass period bounds how late either clock fires: half of the shorter one
        await asyncio.sleep(min(5.0, keepalive_timeout / 2, stall_timeout / 2))
        now = time.monotonic()
        for conn in list(connections):
            if conn.closing:
                if conn.closed_at < now - LINGER - 1:
                    conn.abort()  # closed, but its last bytes never left
            elif not conn.idle:
                continue  # answering: a pipelined request behind it waits for its turn
            elif conn.receiving:
                # idle_since is the time of the last read, or of the last answer sent
                # (a client may hold its body until a deferred `100 Continue`)
                if conn.idle_since < now - stall_timeout:
                    conn.stalled()
            elif conn.idle_since < now - keepalive_timeout:
                conn.close()
