"""An edge server with plain handlers in place of the gateway, for the tests of its
HTTP/1.1 handling (tests/gateway/edge/): what each path answers, and ``run_on`` (behind
the `run` fixture, conftest.py) that runs a scenario against a fresh server on asyncio or
on uvloop, whose transports differ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop

from gateway.edge.call import Call
from gateway.edge.server import HttpServer
from gateway.policy.cors import is_preflight
from tests.support.rawhttp import Client

BIG = 4 * 1024 * 1024
MAX_BODY = 1000


@dataclass
class Edge:
    server: HttpServer
    port: int
    seen: list[tuple[str, str]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    clients: list[Client] = field(default_factory=list)
    slow: float = 0.05  # how long /v1/slow takes: a moment, so later answers must wait

    async def connect(self) -> Client:
        client = await Client.connect(self.port)
        self.clients.append(client)
        return client


async def _handler(edge: Edge, call: Call) -> None:
    edge.seen.append(("fast", call.path))
    edge.calls.append(call)
    if call.too_large:
        call.respond(413, b"too large")
    elif call.refusal is not None:  # the handler answers what the parser refused
        call.respond(call.refusal[0], call.refusal[1].encode())
    elif call.path == "/v1/length":
        call.respond(200, b"%d" % len(call.body), "text/plain")
    elif call.path == "/v1/echo":
        call.respond(200, call.body, "text/plain",
                     {"X-Method": call.method, "X-Query": call.query or "-"})
    elif call.path == "/v1/stream":
        call.start(200, {"Content-Type": "text/plain"})
        for i in range(3):
            await call.write(b"event %d\n" % i)
        call.finish()
    elif call.path == "/v1/big":
        call.start(200, {"Content-Type": "application/octet-stream"})
        piece = bytes(range(256)) * 256  # 64 KiB
        for _ in range(BIG // len(piece)):
            await call.write(piece)
        call.finish()
    elif call.path == "/v1/hang":
        edge.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            edge.cancelled.set()
            raise
    elif call.path == "/v1/slow":
        await asyncio.sleep(edge.slow)  # an answer that takes its time: the handler's pace
        call.respond(200, b"slow")
    else:
        call.respond(404, b"no")


async def _tunnel(edge: Edge, call: Call) -> None:
    edge.seen.append(("tunnel", call.path))
    call.respond(200, b"tunnel " + call.method.encode() + b" " + call.path.encode())


Handler = Callable[[Edge, Call], Awaitable[None]]


@contextlib.asynccontextmanager
async def started_edge(handler: Handler = _handler, tunnel: Handler = _tunnel,
                       decorate: str = "X-Decorated: yes\r\n", **options: Any
                       ) -> AsyncIterator[Edge]:
    """A fresh server; ``options``: HttpServer's keyword arguments (its timeouts)."""
    holder: list[Edge] = []
    def split(call: Call) -> Awaitable[None]:
        # the server has one handler; the tests tell two kinds of route apart by what
        # answers them ("fast": /v1/* and refusals, "tunnel": the rest and preflights)
        other = (not call.path.startswith("/v1/") or is_preflight(call.method, call.headers)) \
            and call.refusal is None
        return (tunnel if other else handler)(holder[0], call)

    server = HttpServer(None, split, lambda c: decorate, max_body=MAX_BODY,
                        **{"keepalive_timeout": 0.4, **options})
    listening = await server.listen("127.0.0.1", 0)
    holder.append(Edge(server, listening.sockets[0].getsockname()[1]))
    try:
        yield holder[0]
    finally:
        for client in holder[0].clients:
            await client.close()
        await server.close()


Scenario = Callable[[Edge], Awaitable[None]]
Run = Callable[[Scenario], None]


def run_on(loop: str, scenario: Scenario, **options: Any) -> None:
    """``scenario`` against a fresh server (``options``: ``started_edge``'s), on a new
    event loop of the kind ``loop`` names."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop

    async def main() -> None:
        async with started_edge(**options) as edge:
            await scenario(edge)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
