"""The backend's response headers reach the client, but for hop-by-hop ones, the framing
and identity the gateway sets itself, and anything carrying the backend's key."""

from __future__ import annotations

import aiohttp
import pytest

from tests.gateway.upstream.scripted import Scripted, answer
from tests.support.fake_llama import BACKEND_KEY
from tests.support.gateway import Gateway

EMBEDDING = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}]}'
CHUNK = (b'{"id":"c1","object":"chat.completion.chunk","created":0,"model":"tiny",'
         b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}')
STREAM = b"data: " + CHUNK + b"\n\ndata: [DONE]\n\n"
PASSED = ("X-Backend-Build: b1234", "Content-Language: en")
DROPPED = ("Connection: keep-alive, X-Hop", "X-Hop: hop", "Keep-Alive: timeout=5, max=100",
           "Trailer: X-Checksum", "Upgrade: h2c", "TE: trailers", "Proxy-Authenticate: Basic",
           "Proxy-Status: llama", "Server: llama.cpp", "Date: Thu, 01 Jan 1970 00:00:00 GMT",
           "X-Request-ID: the-backend-s", "Access-Control-Allow-Origin: *",
           f"X-Echo: Bearer {BACKEND_KEY}", "WWW-Authenticate: Bearer")
MESSAGES = [{"role": "user", "content": "hi"}]


def _check(r: aiohttp.ClientResponse) -> None:
    names = [name.decode().lower() for name, _ in r.raw_headers]
    assert r.headers["X-Backend-Build"] == "b1234" and r.headers["Content-Language"] == "en"
    for line in DROPPED:
        name = line.partition(":")[0]
        if name in ("Server", "Date", "X-Request-ID", "Connection"):
            assert names.count(name.lower()) <= 1, name  # the gateway's own, once
        else:
            assert name.lower() not in names, name
    assert r.headers["Server"] == "llamagate"
    assert r.headers["X-Request-ID"] != "the-backend-s"
    assert "keep-alive, x-hop" not in r.headers.get("Connection", "").lower()
    assert all(BACKEND_KEY not in value.decode() for _, value in r.raw_headers)
    assert names.count("content-type") == 1
    assert names.count("content-length") + names.count("transfer-encoding") == 1


async def test_a_whole_answer_passes_end_to_end_headers(
        scripted: Scripted, scripted_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    scripted.answers[("POST", "/v1/embeddings")] = answer(
        "200 OK", EMBEDDING, "Content-Type: application/json", *PASSED, *DROPPED)
    async with http.post(scripted_gateway.url + "/v1/embeddings",
                         json={"input": "a", "model": "tiny"}) as r:
        assert r.status == 200 and await r.read() == EMBEDDING
        _check(r)
        assert int(r.headers["Content-Length"]) == len(EMBEDDING)


@pytest.mark.parametrize("stream", [True, False], ids=["relayed", "folded"])
async def test_a_stream_passes_end_to_end_headers(
        scripted: Scripted, scripted_gateway: Gateway, http: aiohttp.ClientSession,
        stream: bool) -> None:
    # not streamed by the client, and no max_tokens: fetched as a stream and folded
    scripted.answers[("POST", "/v1/chat/completions")] = answer(
        "200 OK", STREAM, "Content-Type: text/event-stream", *PASSED, *DROPPED)
    async with http.post(scripted_gateway.url + "/v1/chat/completions",
                         json={"messages": MESSAGES, "model": "tiny", "stream": stream}) as r:
        assert r.status == 200
        body = await r.read()
        _check(r)
    if stream:
        assert r.headers["Content-Type"] == "text/event-stream" and body.startswith(b"data: ")
    else:
        assert r.headers["Content-Type"] == "application/json" and b'"content":"hi"' in body
