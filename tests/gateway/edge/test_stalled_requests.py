"""A request that stops arriving half way (its head or its body) is answered 408 after
the stall timeout, OpenAI-shaped, then the connection is closed; a connection idle
between requests, a slow but steady upload and a request waiting for its turn are not
stalled."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway import pipeline
from gateway.edge.call import refusal_error
from gateway.edge.server import HttpServer
from tests.gateway.edge.rendered import run_on
from tests.gateway.edge.support import Edge
from tests.support.gateway import Gateway, assert_openai_error
from tests.support.metrics import scrape
from tests.support.rawhttp import Client, request

STALL = 0.3
# the server's clocks start a moment before the client's: bounds allow for that much
SLACK = 0.05
# the code a 408 is rendered with (whatever gateway/edge/call.py names it)
CODE_408 = refusal_error((408, "")).code


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(("send", "whole_head"), [
    (b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 11, True),
    (b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Le", False),
], ids=["in-the-body", "in-the-head"])
def test_a_stalled_request_gets_408_and_the_connection_closes(
        loop: str, send: bytes, whole_head: bool) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(send)
        sent = time.monotonic()
        # the keep-alive timeout (30 s) is far past this bound: only the stall clock answers
        answer = await client.answer(within=5)
        assert time.monotonic() - sent >= STALL - SLACK
        assert answer.status == 408
        assert answer.headers["content-type"] == "application/json"
        error = assert_openai_error(json.loads(answer.body), "invalid_request_error", CODE_408)
        assert "did not arrive in time" in error["message"]
        assert not answer.keep_alive
        assert await client.closed()
        [call] = edge.calls  # a refusal the handler answered, so it is logged and counted
        assert call.refusal is not None and call.refusal[0] == 408
        # a head read whole names the request; of a broken one nothing is trusted
        assert (call.method, call.path) == (("POST", "/v1/echo") if whole_head else ("-", "/"))
    run_on(loop, scenario, stall_timeout=STALL, keepalive_timeout=30)


def test_a_slow_but_steady_upload_is_not_stalled(loop: str) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        await client.send(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 15\r\n\r\n")
        for _ in range(15):  # one byte per 0.1 s: the whole upload takes 1.5 s, 5 stall timeouts
            await asyncio.sleep(0.1)  # the client's pace, not a wait
            await client.send(b"x")
        answer = await client.answer()
        assert (answer.status, answer.body) == (200, b"x" * 15)
    run_on(loop, scenario, stall_timeout=0.5, keepalive_timeout=30)


@pytest.mark.parametrize("first", [request("POST", "/v1/echo", b"x"), b""],
                         ids=["after-an-answer", "fresh"])
def test_an_idle_connection_is_closed_by_the_keepalive_timeout_without_a_408(
        loop: str, first: bytes) -> None:
    async def scenario(edge: Edge) -> None:
        client = await edge.connect()
        if first:
            await client.send(first)
            assert (await client.answer()).status == 200
        idle = time.monotonic()
        assert await client.read_all(within=5) == b""  # closed, and not one byte of an answer
        assert time.monotonic() - idle >= 0.6 - SLACK  # the keep-alive clock, not the stall one
    run_on(loop, scenario, stall_timeout=0.1, keepalive_timeout=0.6)


def test_a_request_waiting_for_its_turn_is_not_stalled_until_the_answer_before_it(
        loop: str) -> None:
    async def scenario(edge: Edge) -> None:
        edge.slow = 0.8  # the first answer takes longer than the stall timeout, twice over
        client = await edge.connect()
        # a whole request and, pipelined behind it, the start of one that never ends
        await client.send(request("POST", "/v1/slow") + b"POST /v1/echo HTTP/1.1\r\nHost: t\r\n")
        sent = time.monotonic()
        first, refused = await client.answers(2)
        assert (first.status, refused.status) == (200, 408)
        # the stall clock starts once the client is owed nothing: after the first answer
        assert time.monotonic() - sent >= edge.slow + STALL - SLACK
    run_on(loop, scenario, stall_timeout=STALL, keepalive_timeout=30)


@pytest.fixture
async def stalling(gateway: Gateway) -> AsyncIterator[int]:
    """A second edge server in front of ``gateway``'s app, wired as gateway/app.py wires
    its own, with a short stall timeout: its port."""
    state = gateway.state
    server = HttpServer(state, pipeline.handle, pipeline.decorator(state.cors),
                        max_body=state.config.max_body_bytes, stall_timeout=STALL,
                        gate=pipeline.HeadGate())
    listening = await server.listen("127.0.0.1", 0)
    try:
        yield int(listening.sockets[0].getsockname()[1])
    finally:
        await server.close()


async def test_a_stalled_request_is_answered_logged_and_counted_by_the_gateway(
        gateway: Gateway, stalling: int, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamagate.access")
    client = await Client.connect(stalling)
    try:
        await client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nX-Request-ID: slow-1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        answer = await client.answer(within=5)
        assert await client.closed()
    finally:
        await client.close()
    assert answer.status == 408
    assert answer.headers["x-request-id"] == "slow-1"
    assert_openai_error(json.loads(answer.body), "invalid_request_error", CODE_408)
    lines: list[dict[str, Any]] = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                                   if r.name == "llamagate.access"]
    assert [(x["request_id"], x["status"], x["route"]) for x in lines] == [
        ("slow-1", 408, "/v1/chat/completions")]
    _, samples = await scrape(http, gateway.url)
    assert samples.get_value("llamagate_requests_total", ended="completed", route="/v1/chat/completions",
                             status="408", model="-", key_id="-") == 1
