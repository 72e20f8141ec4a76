"""The gateway's HTTP/1.1 server: the listening socket, its connections
(gateway/edge/connection.py) and their clocks (gateway/edge/sweep.py), and how it stops.

aiohttp's server cost ~75 µs of CPU per request on the machines we measure on, more
than the rest of the proxy's hot path together (a bare httptools protocol proxying the
same request: ~40 µs). So every request on the port, refused ones included, is served
here and answered by the one handler given to ``HttpServer``: the pipeline
(gateway/pipeline.py).

One client address (the TCP peer, even behind a trusted proxy: the cap protects the socket
table) holds at most ``max_per_client`` open connections; past it a new one is closed at
once, unanswered (answering would mean reading a request from it first).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from gateway.edge.call import Call, Handler
from gateway.edge.connection import HttpConnection
from gateway.edge.head import Gate
from gateway.edge.sweep import HEAD_TIMEOUT, STALL_TIMEOUT, WRITE_STALL_TIMEOUT, Clocks, sweep
from gateway.edge.write_batch import WriteBatch

__all__ = ["Gate", "HttpConnection", "HttpServer"]


class HttpServer:
    """Owns the listening socket's connections; ``handler`` answers every request."""

    def __init__(self, state: Any, handler: Handler,
                 decorate: Callable[[Call], str], max_body: int,
                 keepalive_timeout: float = 75.0, stall_timeout: float = STALL_TIMEOUT,
                 gate: Gate | None = None, head_timeout: float = HEAD_TIMEOUT,
                 write_stall_timeout: float = WRITE_STALL_TIMEOUT,
                 max_per_client: int = 256) -> None:
        self.state = state
        self.handler = handler
        self.decorate = decorate
        self.max_body = max_body
        self.clocks = Clocks(keepalive_timeout, stall_timeout, head_timeout, write_stall_timeout)
        self.gate = gate  # None: every head goes on (`100 Continue` to any)
        self.max_per_client = max_per_client
        self.per_client: dict[object, int] = {}  # open connections by client address
        self.connections: set[HttpConnection] = set()
        self.batch = WriteBatch()  # a busy loop pass's answers are sent together
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def opened(self, conn: HttpConnection) -> bool:
        peer = conn.peer
        address: object = peer[0] if isinstance(peer, tuple) else peer
        count = self.per_client.get(address, 0)
        if count >= self.max_per_client:
            return False
        self.per_client[address] = count + 1
        conn.counted = True
        return True

    def gone(self, conn: HttpConnection) -> None:
        peer = conn.peer
        address: object = peer[0] if isinstance(peer, tuple) else peer
        count = self.per_client.get(address, 0) - 1
        if count > 0:
            self.per_client[address] = count
        else:
            self.per_client.pop(address, None)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False,
                     backlog: int = 2048) -> asyncio.Server:
        server = await asyncio.get_running_loop().create_server(
            self, host, port, reuse_port=reuse_port or None, backlog=backlog)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(sweep(self.connections, self.clocks),
                                                name="http-sweep")
        return server

    async def stop_listening(self) -> None:
        """Take no new connections; close the idle ones; busy ones close after their answer."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.idle and not conn.receiving:
                conn.close()

    async def close(self, grace: float = 1.0) -> None:
        """Stop; requests still running get ``grace`` seconds, then their clients are cut off."""
        await self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        running = {c.task for c in self.connections if c.task is not None}
        if running:
            await asyncio.wait(running, timeout=grace)
        running = {c.task for c in self.connections if c.task is not None} | {
            t for t in running if not t.done()}
        for conn in list(self.connections):
            conn.abort()  # whatever is left, even a client that stopped reading
        if running:  # cut off: let them unwind before what they use is torn down
            await asyncio.wait(running, timeout=grace)
        for server in self._servers:
            await server.wait_closed()
