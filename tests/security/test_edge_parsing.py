"""Issue 21, bugs 4 and 6: one parse decides for every route, with one set of answers.
Two `Host` headers and a `*` target are 400 (RFC 9112 3.2, and llama-server has no use for
`*`), answered as every refusal is: the gateway's JSON error with its X-Request-ID and a
`Server` header that names no version. A request head counts whole against its 64 KiB,
however few reads carry it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, serve_gateway
from tests.support.rawhttp import Answer, Client


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    upstream = FakeLlama()
    await upstream.start()
    try:
        async with serve_gateway(upstream.url, {}) as served:
            yield served
    finally:
        await upstream.close()


async def one_answer(gw: Gateway, data: bytes) -> tuple[Answer, bool]:
    """The answer to ``data`` sent in one write, and whether the server closed after it."""
    client = await Client.sending(gw.port, data)
    try:
        answer = await client.answer()
        return answer, await client.closed()
    finally:
        await client.close()


def assert_refused(answer: Answer, status: int, type_: str, code: str) -> None:
    assert answer.status == status, answer
    assert_openai_error(json.loads(answer.body), type_, code)
    assert answer.headers.get("x-request-id")  # through the pipeline, as other refusals
    assert answer.headers["server"] == "llamagate"


@pytest.mark.parametrize("data", [
    b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nhost: b\r\n\r\n{}",
    b"GET /v1/models HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
], ids=["v1", "own-route", "post", "http10"])
async def test_two_host_headers_get_400(gw: Gateway, data: bytes) -> None:
    answer, closed = await one_answer(gw, data)
    assert_refused(answer, 400, "invalid_request_error", "invalid_request")
    assert b"Host" in json.loads(answer.body)["error"]["message"].encode()
    assert closed


@pytest.mark.parametrize("method", ["OPTIONS", "GET", "POST"])
async def test_an_asterisk_target_gets_400(gw: Gateway, method: str) -> None:
    length = "Content-Length: 0\r\n" if method == "POST" else ""
    answer, closed = await one_answer(gw, f"{method} * HTTP/1.1\r\nHost: a\r\n{length}\r\n".encode())
    assert_refused(answer, 400, "invalid_request_error", "invalid_request")
    assert closed


async def test_a_158_kib_head_in_one_write_gets_431(gw: Gateway) -> None:
    # every field within its own 8190 bytes, 20 of them: 158 KiB, in one write
    pad = "".join(f"X-Pad-{i}: {'p' * 8090}\r\n" for i in range(20))
    data = f"GET /v1/models HTTP/1.1\r\nHost: a\r\n{pad}\r\n".encode()
    assert len(data) > 158 * 1024
    answer, closed = await one_answer(gw, data)
    assert answer.status == 431, answer
    assert answer.headers.get("x-request-id") and answer.headers["server"] == "llamagate"
    assert closed


async def test_a_head_just_under_64_kib_is_served(gw: Gateway) -> None:
    pad = "".join(f"X-Pad-{i}: {'p' * 8000}\r\n" for i in range(7))
    answer, _ = await one_answer(
        gw, f"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{pad}\r\n".encode())
    assert answer.status == 200, answer
