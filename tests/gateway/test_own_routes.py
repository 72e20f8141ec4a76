"""Requests off the token path (the gateway's own routes: probes, /admin, these test routes)
are answered by the one pipeline on the client's connection, which goes on serving /v1
requests: streamed and whole answers, pipelining, HEAD, cancellation, HTTP/1.0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gateway.edge.call import Call
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, serve_gateway
from tests.support.rawhttp import Client, chunked, request

COMPLETION = json.dumps({"prompt": "a", "max_tokens": 2}).encode()


@dataclass
class Routes:
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(self, call: Call) -> None:
        call.start(200, {"Content-Type": "text/plain"})
        for i in range(3):
            await call.write(b"part %d\n" % i)
        call.finish()

    async def echo(self, call: Call) -> None:
        call.respond(200, call.body, content_type="text/plain")

    async def hang(self, call: Call) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def closing(self, call: Call) -> None:
        call.keep_alive = False
        call.respond(200, b"bye", content_type="text/plain")

    async def boom(self, call: Call) -> None:
        raise RuntimeError("a bug in a handler")


@pytest.fixture
async def routes() -> Routes:
    return Routes()


@pytest.fixture
async def served(fake: FakeLlama, routes: Routes, tmp_path: object) -> AsyncIterator[Gateway]:
    async with serve_gateway(fake.url, {}, extra_routes=[
            (["GET"], "/test/stream", routes.stream), (["POST"], "/test/echo", routes.echo),
            (["GET"], "/test/hang", routes.hang), (["GET"], "/test/closing", routes.closing),
            (["GET"], "/test/boom", routes.boom)]) as gateway:
        yield gateway


@pytest.fixture
async def client(served: Gateway) -> AsyncIterator[Client]:
    client = await Client.connect(served.port)
    try:
        yield client
    finally:
        await client.close()


async def test_one_connection_serves_both_sides_in_turn(client: Client) -> None:
    await client.send(request("GET", "/test/stream"))
    streamed = await client.answer()
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert streamed.body == b"part 0\npart 1\npart 2\n"
    await client.send(request("POST", "/v1/completions", COMPLETION,
                              {"Content-Type": "application/json"}))
    completion = await client.answer()
    assert completion.status == 200
    assert json.loads(completion.body)["object"] == "text_completion"
    await client.send(request("GET", "/health"))
    health = await client.answer()
    assert health.status == 200
    assert "x-request-id" in health.headers  # the aiohttp pipeline ran for it


async def test_pipelined_requests_across_both_sides_keep_their_order(client: Client) -> None:
    await client.send(request("GET", "/test/stream") + request("POST", "/v1/completions", COMPLETION)
                      + request("POST", "/test/echo", b"third"))
    stream, completion, echo = await client.answers(3)
    assert stream.body == b"part 0\npart 1\npart 2\n"
    assert json.loads(completion.body)["object"] == "text_completion"
    assert echo.body == b"third"


async def test_a_chunked_body_reaches_the_aiohttp_handler(client: Client) -> None:
    await client.send(chunked("POST", "/test/echo", [b"one ", b"two"]))
    answer = await client.answer()
    assert (answer.status, answer.body) == (200, b"one two")


async def test_head_is_answered_without_a_body_and_the_connection_goes_on(client: Client) -> None:
    await client.send(request("HEAD", "/health") + request("POST", "/test/echo", b"after"))
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    rest = await client.answer()  # the next answer starts right after the head
    assert rest.body == b"after"


async def test_a_client_that_leaves_cancels_the_aiohttp_handler(client: Client,
                                                                routes: Routes) -> None:
    await client.send(request("GET", "/test/hang"))
    await asyncio.wait_for(routes.entered.wait(), 5)
    await client.close()
    await asyncio.wait_for(routes.cancelled.wait(), 5)


async def test_an_answer_that_closes_the_connection_closes_it(client: Client) -> None:
    await client.send(request("GET", "/test/closing"))
    answer = await client.answer()
    assert answer.body == b"bye"
    assert not answer.keep_alive
    assert await client.closed()


async def test_a_handler_bug_is_a_500_in_openai_shape_and_the_connection_survives(
        client: Client) -> None:
    await client.send(request("GET", "/test/boom"))
    answer = await client.answer()
    assert answer.status == 500
    assert json.loads(answer.body)["error"]["code"] == "internal_error"
    await client.send(request("POST", "/test/echo", b"still here"))
    assert (await client.answer()).body == b"still here"


async def test_an_http10_probe_without_host_is_answered(client: Client) -> None:
    await client.send(b"GET /ping HTTP/1.0\r\n\r\n")
    raw = await client.read_all()
    assert raw.startswith(b"HTTP/1.1 200 ")  # a server names its own version (RFC 9110 2.5)
    assert b"\r\nServer: llamagate\r\n" in raw  # no software versions on either side


async def test_an_http10_keep_alive_client_is_kept_across_both_sides(client: Client) -> None:
    for path in ("/ping", "/test/stream", "/health"):
        await client.send(request("GET", path, headers={"Connection": "keep-alive"},
                                  version="1.0"))
        if path == "/test/stream":  # an HTTP/1.0 stream can only end with the connection
            raw = await client.read_all()
            assert raw.endswith(b"part 0\npart 1\npart 2\n")
            return
        answer = await client.answer()
        assert answer.status == 200
        assert answer.headers["connection"].lower() == "keep-alive"
