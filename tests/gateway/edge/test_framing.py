"""The edge server's HTTP/1.1 framing: keep-alive across both sides, pipelining order,
request bodies (chunked, `100-continue`, trailers), HTTP/1.0, streams, HEAD."""

from __future__ import annotations

import asyncio

from tests.gateway.edge.support import BIG, Edge, Run
from tests.support.rawhttp import chunked, request
from tests.support.wait import wait_until


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


def test_a_large_stream_to_a_slow_reader_arrives_intact(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/big"))
        # the client reads nothing yet: the server's buffer fills and it must wait for the reader
        await wait_until(lambda: any(c.paused for c in edge.server.connections), "a paused writer", within=10)
        answer = await client.answer(within=20)
        piece = bytes(range(256)) * 256
        assert len(answer.body) == BIG
        assert answer.body == piece * (BIG // len(piece))
    run(scenario)


def test_an_http10_keep_alive_client_is_told_and_kept(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        for path in ("/v1/echo", "/ping", "/v1/echo"):
            await client.send(request("POST", path, b"k", {"Connection": "keep-alive"},
                                      version="1.0"))
            answer = await client.answer()
            assert answer.status == 200
            assert answer.headers["connection"].lower() == "keep-alive"
        assert [kind for kind, _ in edge.seen] == ["fast", "tunnel", "fast"]  # one connection
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
