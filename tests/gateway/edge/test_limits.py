"""The edge server's limits and lifecycle: bodies and heads over the limits, broken and
upgrade requests, disconnects, the idle sweep, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from tests.gateway.edge.support import Edge, Run
from tests.support.rawhttp import Client, chunked, request
from tests.support.wait import wait_until


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


@pytest.mark.parametrize(("send", "why"), [
    (b"NOT HTTP AT ALL\r\n\r\n", b"malformed HTTP request"),
    (b"GET /v1/echo HTTP/1.1\r\n\r\n", b"Host header"),
    (b"GET /v1/echo HTTP/2.0\r\nHost: x\r\n\r\n", b"HTTP/2.0 is not served"),
    (b"GET /v1/echo\r\n\r\n", b"HTTP/0.9 is not served"),  # a bare request line
    # the parser stops at an upgrade's head: its body would be lost
    (request("POST", "/v1/echo", b"lost", {"Connection": "Upgrade", "Upgrade": "h2c"}),
     b"upgrades are not supported"),
], ids=["malformed", "http11-without-host", "http2-request-line", "http09", "upgrade-with-body"])
def test_a_request_we_cannot_take_gets_400_and_the_connection_closes(
        run: Run, send: bytes, why: bytes) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(send)
        answer = await client.answer()
        assert answer.status == 400
        assert why in answer.body
        assert await client.closed()
        # answered by the handler (so it is logged and counted), as a refusal, nothing else
        assert [c.refusal and c.refusal[0] for c in edge.calls] == [400]
    run(scenario)


def test_a_client_that_leaves_cancels_its_request(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("POST", "/v1/hang", b"{}"))
        await asyncio.wait_for(edge.hanging.wait(), 5)
        await client.close()
        await asyncio.wait_for(edge.cancelled.wait(), 5)
        assert all(c.closing for c in edge.server.connections)  # gone, or on its way out
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
        assert [c.refusal and c.refusal[0] for c in edge.calls] == [status]
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
        await wait_until(lambda: ("fast", "/v1/slow") in edge.seen, "the request to start", within=5)
        await edge.server.close(grace=5)
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"slow")
        assert not answer.keep_alive
    run(scenario)


def test_a_head_split_over_reads_is_not_counted_with_its_body(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        edge.server.max_body = 200_000
        client = await edge.connect()
        body = b"x" * 150_000  # over the 64 KiB head limit, arriving in the head's last read
        data = request("POST", "/v1/length", body)
        await client.send(data[:20])
        await wait_until(lambda: any(c.receiving for c in edge.server.connections),
                         "the first part of the head to be read", within=5)
        await client.send(data[20:])
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"150000")
    run(scenario)


def test_close_cuts_off_a_client_that_stopped_reading(run: Run) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(request("GET", "/v1/big"))  # the client never reads it
        await wait_until(lambda: any(c.paused for c in edge.server.connections), "a paused writer",
                         within=10)
        await edge.server.close(grace=0.2)
        assert edge.server.connections == set()  # aborted, not left waiting on the reader
    run(scenario)


