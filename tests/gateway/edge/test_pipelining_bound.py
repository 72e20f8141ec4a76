"""A pipelining client cannot make one connection hold more than about one request beyond
the one being answered: the server stops reading while a whole request waits its turn, and
reads again once it is answered."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from gateway.edge.call import Call
from gateway.edge.connection import HttpConnection
from gateway.edge.server import HttpServer
from tests.support.rawhttp import Client, request
from tests.support.wait import wait_until

BODY = 512 * 1024  # MAX_BODY_BYTES here, and the size of every pipelined body
QUEUED = 6  # requests sent behind the one held: ~3 MiB in all
# what one read brings in at most (asyncio's and uvloop's reads are 256 KiB), past which
# the parser may go on with a request that follows the one that filled the queue
READ = 256 * 1024
BOUND = BODY + READ + 4096  # one queued body, one read of the next, and heads


def held(conn: HttpConnection) -> int:
    """Request bytes the connection holds beyond the one being answered: the bodies of
    the requests waiting their turn, and the part of the next one already parsed."""
    return sum(len(c.body) for c in conn.pending) + sum(len(b) for b in conn._body)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_pipelining_client_holds_at_most_one_request_beyond_the_current_one(loop: str) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def handler(call: Call) -> None:
            if call.path == "/v1/hold":
                await release.wait()
            call.respond(200, b"%d" % len(call.body), "text/plain")

        server = HttpServer(None, handler, lambda call: "", max_body=BODY)
        listening = await server.listen("127.0.0.1", 0)
        client = await Client.connect(listening.sockets[0].getsockname()[1])
        try:
            [conn] = await wait_until(lambda: list(server.connections), what="the connection")
            body = b"x" * BODY
            async with asyncio.TaskGroup() as tasks:  # the client writes while the server reads
                tasks.create_task(client.send(
                    request("POST", "/v1/hold") +
                    b"".join(request("POST", "/v1/length", body) for _ in range(QUEUED))))
                # either the server stops reading with a request queued, or it holds too much
                await wait_until(lambda: held(conn) > BOUND or (
                    conn.pending and conn.transport is not None
                    and not conn.transport.is_reading()),
                    what="the server to stop reading or to hold more than the bound")
                assert held(conn) <= BOUND
                assert conn.current is not None and conn.current.path == "/v1/hold"
                release.set()
                # reading resumes as the queue empties: every request is answered, in order
                answers = await client.answers(1 + QUEUED, within=10)
            assert [(a.status, a.body) for a in answers] == (
                [(200, b"0")] + [(200, b"%d" % BODY)] * QUEUED)
            assert conn.transport is not None and conn.transport.is_reading()
        finally:
            release.set()
            await client.close()
            await server.close()

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())
