"""An edge server whose handler answers refusals as the gateway's does (OpenAI-shaped
error JSON through ``refusal_error``, as gateway/edge.py), with the timeouts a test
chooses: for the tests of stalled requests and compressed bodies. ``run_on`` runs a
scenario against a fresh one on asyncio or on uvloop, whose transports differ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import uvloop

from gateway.errors import error_parts
from gateway.http_call import Call, refusal_error
from gateway.http_server import EdgeServer
from tests.gateway.http_client import Client

MAX_BODY = 1000


@dataclass
class Rendered:
    server: EdgeServer
    port: int
    calls: list[Call] = field(default_factory=list)
    slow: float = 0.0  # how long /v1/slow takes to answer
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        client = await Client.connect(self.port)
        self.clients.append(client)
        return client


async def _handler(edge: Rendered, call: Call) -> None:
    edge.calls.append(call)
    if call.refusal is not None:
        status, headers, body = error_parts(refusal_error(call.refusal))
        call.respond(status, body, headers=headers)
    elif call.path == "/v1/echo":  # the body and the coding as the handler sees them
        encodings = [v for n, v in call.raw_headers if n.lower() == b"content-encoding"]
        call.respond(200, call.body, "text/plain", {
            "X-Seen-Encoding": call.headers.get("content-encoding", "-"),
            "X-Seen-Raw-Encodings": str(len(encodings))})
    elif call.path == "/v1/slow":
        await asyncio.sleep(edge.slow)  # an answer that takes its time: the handler's pace
        call.respond(200, b"slow", "text/plain")
    else:
        call.respond(404, b"no", "text/plain")


@contextlib.asynccontextmanager
async def started(**timeouts: float) -> AsyncIterator[Rendered]:
    holder: list[Rendered] = []
    server = EdgeServer(None, lambda c: _handler(holder[0], c), lambda c: _handler(holder[0], c),
                        lambda c: "", max_body=MAX_BODY, **timeouts)
    listening = await server.listen("127.0.0.1", 0)
    holder.append(Rendered(server, listening.sockets[0].getsockname()[1]))
    try:
        yield holder[0]
    finally:
        for client in holder[0].clients:
            await client.close()
        await server.close()


def run_on(loop: str, scenario: Callable[[Rendered], Awaitable[None]], **timeouts: float) -> None:
    """``scenario`` against a fresh server built with ``timeouts`` (EdgeServer's keyword
    arguments), on a new event loop of the kind ``loop`` names."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop

    async def main() -> None:
        async with started(**timeouts) as edge:
            await scenario(edge)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
