"""Request bodies sent with `Content-Encoding: gzip` or `deflate` are decoded before anyone
reads them, and the coding is not passed on; what they inflate to is bounded by the
body limit (413); a corrupt one, or any other coding, is refused with 400."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from tests.gateway.edge.rendered import run_on
from tests.gateway.edge.support import MAX_BODY, Edge
from tests.support.fake_llama import MODEL, FakeLlama
from tests.support.gateway import Gateway, assert_openai_error
from tests.support.rawhttp import Answer, Client, request

TEXT = b'{"text": "' + b"compressible " * 40 + b'"}'  # 530 bytes: under MAX_BODY (1000)


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _send(edge: Edge, body: bytes, encoding: str, path: str = "/v1/echo") -> Answer:
    client = await edge.connect()
    await client.send(request("POST", path, body, {"Content-Encoding": encoding}))
    return await client.answer()


@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", gzip.compress(TEXT)),
    ("x-gzip", gzip.compress(TEXT)),
    ("GZip", gzip.compress(TEXT)),
    ("gzip", gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:])),  # two members
    ("deflate", zlib.compress(TEXT)),  # RFC 9110's deflate: zlib-wrapped
    ("deflate", _raw_deflate(TEXT)),  # what some clients send as deflate
    ("deflate, gzip", gzip.compress(zlib.compress(TEXT))),  # deflated, then gzipped
    ("identity", TEXT),
], ids=["gzip", "x-gzip", "case", "gzip-members", "deflate-zlib", "deflate-raw", "chain", "identity"])
def test_a_compressed_body_is_decoded_and_its_coding_not_passed_on(
        loop: str, encoding: str, body: bytes) -> None:
    async def scenario(edge: Edge) -> None:
        answer = await _send(edge, body, encoding)
        assert (answer.status, answer.body) == (200, TEXT)
        assert (answer.headers["x-seen-encoding"], answer.headers["x-seen-raw-encodings"]) == ("-", "0")
        assert answer.keep_alive
    run_on(loop, scenario)


def test_a_body_decoded_to_exactly_the_limit_is_taken(loop: str) -> None:
    async def scenario(edge: Edge) -> None:
        answer = await _send(edge, gzip.compress(b"x" * MAX_BODY), "gzip")
        assert (answer.status, answer.body) == (200, b"x" * MAX_BODY)
    run_on(loop, scenario)


@pytest.mark.parametrize("body", [
    gzip.compress(b"x" * (MAX_BODY + 1)),
    gzip.compress(b"\0" * 500_000),  # 518 bytes that would inflate to 500 KB
    gzip.compress(b"x" * 600) + gzip.compress(b"x" * 600),  # each member under, both over
], ids=["one-over", "bomb", "members"])
def test_a_body_that_inflates_past_the_limit_gets_413(loop: str, body: bytes) -> None:
    async def scenario(edge: Edge) -> None:
        assert len(body) < MAX_BODY  # the compressed body itself is within the limit
        client = await edge.connect()
        await client.send(request("POST", "/v1/echo", body, {"Content-Encoding": "gzip"}))
        answer = await client.answer()
        assert answer.status == 413
        error = assert_openai_error(json.loads(answer.body), "invalid_request_error",
                                    "payload_too_large")
        assert "decompressed" in error["message"] and "MAX_BODY_BYTES" in error["message"]
        # the body was read whole, so the connection still frames requests: it is kept
        await client.send(request("POST", "/v1/echo", b"next"))
        assert (await client.answer()).body == b"next"
    run_on(loop, scenario)


@pytest.mark.parametrize(("encoding", "body", "why"), [
    ("gzip", TEXT, "not valid gzip data"),  # not compressed at all
    ("gzip", gzip.compress(TEXT)[:-12], "not valid gzip data"),  # cut short
    ("deflate", zlib.compress(TEXT)[:-3], "not valid deflate data"),  # checksum cut
    ("deflate", zlib.compress(TEXT) + b"junk", "bytes follow its end"),
    ("gzip", gzip.compress(TEXT) + b"junk", "not valid gzip data"),
    # each empty member made the decoder copy the rest of the body: minutes for 10 MB
    ("gzip", gzip.compress(b"", mtime=0) * 17, "more than 16 gzip members"),
], ids=["plain-as-gzip", "truncated-gzip", "truncated-deflate", "deflate-trailer", "gzip-trailer",
        "too-many-members"])
def test_a_corrupt_compressed_body_gets_400(loop: str, encoding: str, body: bytes, why: str) -> None:
    async def scenario(edge: Edge) -> None:
        answer = await _send(edge, body, encoding)
        assert answer.status == 400
        error = assert_openai_error(json.loads(answer.body), "invalid_request_error",
                                    "invalid_request")
        assert why in error["message"]
    run_on(loop, scenario)


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_any_other_coding_gets_400_naming_the_accepted_ones(loop: str, encoding: str) -> None:
    async def scenario(edge: Edge) -> None:
        answer = await _send(edge, gzip.compress(TEXT), encoding)
        assert answer.status == 400
        error = assert_openai_error(json.loads(answer.body), "invalid_request_error",
                                    "invalid_request")
        assert "'" + encoding.split(", ")[-1] + "' is not supported" in error["message"]
        assert "gzip, deflate or identity" in error["message"]
        assert [c.refusal and c.refusal[0] for c in edge.calls] == [400]
    run_on(loop, scenario)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 50}],
        "max_tokens": 4}


async def test_a_gzip_chat_request_reaches_the_backend_decoded(
        gateway: Gateway, fake: FakeLlama) -> None:
    client = await Client.connect(gateway.port)
    try:
        await client.send(request("POST", "/v1/chat/completions", gzip.compress(json.dumps(CHAT).encode()),
                                  {"Content-Type": "application/json", "Content-Encoding": "gzip"}))
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 200, answer.body
    [seen] = fake.requests("/v1/chat/completions")
    assert "content-encoding" not in {name.lower() for name in seen.headers}
    assert seen.json()["messages"] == CHAT["messages"]


async def test_an_unsupported_coding_is_refused_by_the_gateway_before_the_backend(
        gateway: Gateway, fake: FakeLlama) -> None:
    client = await Client.connect(gateway.port)
    try:
        await client.send(request("POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                                  {"Content-Type": "application/json", "Content-Encoding": "br"}))
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 400
    assert answer.headers["x-request-id"]
    error = assert_openai_error(json.loads(answer.body), "invalid_request_error", "invalid_request")
    assert "gzip, deflate or identity" in error["message"]
    assert fake.requests() == []
