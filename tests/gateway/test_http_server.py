"""The edge server's HTTP/1.1 handling, with plain handlers in place of the gateway:
keep-alive, pipelining, framing of bodies both ways, limits, disconnects, idle timeout.

Every test runs on both event loops: asyncio, and uvloop (what gateway workers run),
whose transports differ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from gateway.http_call import Call
from gateway.http_server import EdgeServer
from tests.gateway.http_client import Client, chunked, request
from tests.gateway.support import wait_until

BIG = 4 * 1024 * 1024
MAX_BODY = 1000


@dataclass
class Edge:
    server: EdgeServer
    port: int
    seen: list[tuple[str, str]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        client = await Client.connect(self.port)
        self.clients.append(client)
        return client


async def _handler(edge: Edge, call: Call) -> None:
    edge.seen.append(("fast", call.path))
    edge.calls.append(call)
    if call.too_large:
        call.respond(413, b"too large")
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
        await asyncio.sleep(0.05)  # an answer that takes a moment, so later ones must wait
        call.respond(200, b"slow")
    else:
        call.respond(404, b"no")


async def _tunnel(edge: Edge, call: Call) -> None:
    edge.seen.append(("tunnel", call.path))
    call.respond(200, b"tunnel " + call.method.encode() + b" " + call.path.encode())


@contextlib.asynccontextmanager
async def started_edge() -> AsyncIterator[Edge]:
    holder: list[Edge] = []
    server = EdgeServer(None, lambda c: _handler(holder[0], c), lambda c: _tunnel(holder[0], c),
                        lambda c: "X-Decorated: yes\r\n", max_body=MAX_BODY, keepalive_timeout=0.4)
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


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """`run(scenario)`: the scenario against a fresh edge server, on a new loop of the
    parameter's kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            async with started_edge() as edge:
                await scenario(edge)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    return run


def test_keep_alive_serves_fast_and_handed_over_requests_in_turn(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        for path in ("/v1/echo", "/health", "/v1/echo", "/metrics"):
            await client.send(request("POST", path, b"x"))
            answer = await client.answer()
            assert answer.status == 200
            assert answer.keep_alive
            assert answer.headers["x-decorated"] == "yes"
            assert "date" in answer.headers
        assert edge.seen == [("fast", "/v1/echo"), ("tunnel", "/health"), ("fast", "/v1/echo"),
                             ("tunnel", "/metrics")]
    run(scenario)


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/slow", b"") + request("GET", "/ping")
                          + request("POST", "/v1/echo", b"third"))
        slow, ping, echo = await client.answers(3)
        assert (slow.body, ping.body, echo.body) == (b"slow", b"tunnel GET /ping", b"third")
    run(scenario)


def test_a_chunked_request_body_arrives_whole(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(chunked("POST", "/v1/echo", [b"hello ", b"chunked ", b"world"]))
        answer = await client.answer()
        assert answer.body == b"hello chunked world"
    run(scenario)


def test_expect_100_continue_is_answered_before_the_body(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        head = b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        await client.send(head)
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(b"body")
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"body")
    run(scenario)


def test_query_string_and_percent_encoded_path(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/%65cho?a=1&b=%20"))
        answer = await client.answer()
        assert answer.status == 200
        assert answer.headers["x-query"] == "a=1&b=%20"  # the query is passed on as sent
        assert edge.seen[-1] == ("fast", "/v1/echo")
    run(scenario)


def test_http10_is_answered_then_closed(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/echo", version="1.0"))
        raw = await client.read_all()
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nConnection: close\r\n" in raw
    run(scenario)


def test_a_stream_to_an_http10_client_is_delimited_by_the_close(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/stream", version="1.0"))
        raw = await client.read_all()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head
        assert body == b"event 0\nevent 1\nevent 2\n"
    run(scenario)


def test_a_stream_is_chunked_and_the_connection_kept(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/stream"))
        answer = await client.answer()
        assert answer.headers["transfer-encoding"] == "chunked"
        assert answer.body == b"event 0\nevent 1\nevent 2\n"
        await client.send(request("POST", "/v1/echo", b"again"))
        assert (await client.answer()).body == b"again"
    run(scenario)


def test_connection_close_is_honoured(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/echo", b"x", {"Connection": "close"}))
        answer = await client.answer()
        assert answer.status == 200
        assert not answer.keep_alive
        assert await client.closed()
    run(scenario)


def test_head_gets_the_head_only(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("HEAD", "/v1/echo", headers={"Connection": "close"}))
        raw = await client.read_all()
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert raw.endswith(b"\r\n\r\n")  # Content-Length is there, the body is not
    run(scenario)


@pytest.mark.parametrize("send", [
    request("POST", "/v1/echo", b"x" * 1001),
    chunked("POST", "/v1/echo", [b"x" * 600, b"x" * 600]),
    request("POST", "/admin/keys", b"x" * 1001),  # not handed over: the body was never read
], ids=["content-length", "chunked", "handed-over-route"])
def test_a_body_over_the_limit_gets_413_and_the_connection_closes(run: Run, send: bytes) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(send)
        answer = await client.answer()
        assert (answer.status, answer.body) == (413, b"too large")
        assert not answer.keep_alive
        assert await client.closed()
        assert all(kind == "fast" for kind, _ in edge.seen)
    run(scenario)


def test_a_malformed_request_gets_400_and_the_connection_closes(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await client.answer()
        assert answer.status == 400
        assert b"malformed HTTP request" in answer.body
        assert await client.closed()
        assert edge.seen == []
    run(scenario)


def test_a_client_that_leaves_cancels_its_request(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/hang", b"{}"))
        await asyncio.wait_for(edge.hanging.wait(), 5)
        await client.close()
        await asyncio.wait_for(edge.cancelled.wait(), 5)
        assert edge.server.connections == set() or all(c.closed for c in edge.server.connections)
    run(scenario)


def test_a_large_stream_to_a_slow_reader_arrives_intact(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/big"))
        # the client reads nothing yet: the server's buffer fills and it must wait for the reader
        await wait_until(lambda: any(c.paused for c in edge.server.connections), 10, "a paused writer")
        answer = await client.answer(within=20)
        piece = bytes(range(256)) * 256
        assert len(answer.body) == BIG
        assert answer.body == piece * (BIG // len(piece))
    run(scenario)


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/echo", b"x"))
        assert (await client.answer()).status == 200
        assert await client.closed(within=5)  # keepalive_timeout is 0.4 s here
    run(scenario)


def test_stop_listening_closes_idle_connections_and_refuses_new_ones(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        idle = await edge.connect()
        await idle.send(request("POST", "/v1/echo", b"x"))
        await idle.answer()
        await edge.server.stop_listening()
        assert await idle.closed()
        with pytest.raises(OSError):
            await Client.connect(edge.port)
    run(scenario)


@pytest.mark.parametrize("upgrade", ["h2c", "websocket"])
def test_an_upgrade_request_is_answered_as_a_plain_one_then_closed(run: Run, upgrade: str) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/echo", headers={
            "Connection": "Upgrade", "Upgrade": upgrade}))
        answer = await client.answer()
        assert answer.status == 200
        assert answer.headers["x-method"] == "GET"
        assert await client.closed()
    run(scenario)


def test_an_upgrade_request_with_a_body_is_refused(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/echo", b"lost", {
            "Connection": "Upgrade", "Upgrade": "h2c"}))
        answer = await client.answer()
        assert answer.status == 400
        assert b"upgrades are not supported" in answer.body
        assert await client.closed()
        assert edge.seen == []
    run(scenario)


def test_garbage_after_a_request_is_refused_after_its_answer(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/slow", b"") + b"\x00\x01 NOT HTTP\r\n\r\n")
        answer, refusal = await client.answers(2)
        assert (answer.status, answer.body) == (200, b"slow")
        assert refusal.status == 400  # in its turn, after the answer owed before it
        assert b"malformed HTTP request" in refusal.body
        assert await client.closed()
    run(scenario)


def test_a_request_after_connection_close_is_not_served(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/slow", b"", {"Connection": "close"})
                          + request("POST", "/v1/echo", b"never"))
        raw = await client.read_all()
        assert raw.count(b"HTTP/1.1 ") == 1
        assert edge.seen == [("fast", "/v1/slow")]
    run(scenario)


@pytest.mark.parametrize(("send", "status"), [
    (request("GET", "/v1/echo?" + "q" * 9000), 414),
    (request("GET", "/v1/echo", headers={"X-Big": "v" * 9000}), 431),
    (request("GET", "/v1/echo", headers={f"X-H{i}": "v" for i in range(200)}), 431),
], ids=["long-target", "long-header", "many-headers"])
def test_oversized_heads_are_refused(run: Run, send: bytes, status: int) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(send)
        answer = await client.answer()
        assert answer.status == status
        assert not answer.keep_alive
        assert await client.closed()
        assert edge.seen == []
    run(scenario)


def test_an_http10_keep_alive_client_is_told_and_kept(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        for path in ("/v1/echo", "/ping", "/v1/echo"):
            await client.send(request("POST", path, b"k", {"Connection": "keep-alive"},
                                      version="1.0"))
            answer = await client.answer()
            assert answer.status == 200
            assert answer.headers.get("connection", "").lower() == "keep-alive" or \
                path == "/ping"  # the handed-over answer here is the test's stand-in
    run(scenario)


def test_each_pipelined_answer_uses_its_own_requests_http_version(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/stream")
                          + request("GET", "/v1/stream", version="1.0"))
        raw = await client.read_all()
        first, _, second = raw.partition(b"0\r\n\r\n")  # the chunked answer's last chunk
        assert b"Transfer-Encoding: chunked" in first
        assert second.startswith(b"HTTP/1.1 200 ")
        assert b"Transfer-Encoding" not in second
        assert second.endswith(b"event 0\nevent 1\nevent 2\n")
    run(scenario)


def test_100_continue_waits_for_the_answers_before_it(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/slow", b"")
                          + b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                            b"Expect: 100-continue\r\n\r\n")
        slow, interim = await client.answers(2)
        assert (slow.body, interim.status) == (b"slow", 100)
        await client.send(b"ok")
        assert (await client.answer()).body == b"ok"
    run(scenario)


def test_a_slow_upload_is_not_cut_by_the_keepalive_timeout(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):  # one byte per 0.1 s: the upload outlasts the 0.4 s timeout
            await asyncio.sleep(0.1)  # a slow client's pace, not a wait for the server
            await client.send(b"x")
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"x" * 10)
    run(scenario)


def test_close_lets_a_running_request_finish(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/slow", b""))
        await wait_until(lambda: ("fast", "/v1/slow") in edge.seen, 5, "the request to start")
        await edge.server.close(grace=5)
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"slow")
        assert not answer.keep_alive
    run(scenario)


def test_chunked_trailers_never_become_request_headers(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabc\r\n0\r\nX-Method: injected\r\n\r\n")
        answer = await client.answer()
        assert answer.body == b"abc"
        assert answer.headers["x-method"] == "POST"  # the handler did not see the trailer
        assert "x-method" not in edge.calls[-1].headers
    run(scenario)


def test_a_head_split_over_reads_is_not_counted_with_its_body(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        edge.server.max_body = 200_000
        client = await edge.connect()
        body = b"x" * 150_000  # over the 64 KiB head limit, arriving in the head's last read
        data = request("POST", "/v1/length", body)
        await client.send(data[:20])
        await wait_until(lambda: any(c.receiving for c in edge.server.connections), 5,
                         "the first part of the head to be read")
        await client.send(data[20:])
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"150000")
    run(scenario)


def test_close_cuts_off_a_client_that_stopped_reading(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/big"))  # the client never reads it
        await wait_until(lambda: any(c.paused for c in edge.server.connections), 10,
                         "a paused writer")
        await edge.server.close(grace=0.2)
        assert edge.server.connections == set()  # aborted, not left waiting on the reader
    run(scenario)


def test_an_http11_request_without_host_is_refused(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(b"GET /v1/echo HTTP/1.1\r\n\r\n")
        answer = await client.answer()
        assert answer.status == 400
        assert b"Host header" in answer.body
        assert await client.closed()
        assert edge.seen == []
    run(scenario)
