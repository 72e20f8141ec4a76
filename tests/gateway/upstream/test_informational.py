"""1xx heads from the backend (100 Continue, 103 Early Hints) are not answers: the proxy
waits for the final one."""

from __future__ import annotations

import json

import aiohttp

from gateway.upstream.client import BackendPool
from tests.gateway.upstream.scripted import Scripted, answer
from tests.support.gateway import Gateway

EMBEDDING = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}]}'
INTERIM = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 103 Early Hints\r\nLink: </hint>; rel=preload\r\n\r\n")


async def test_the_pool_skips_1xx_heads_for_the_final_answer(scripted: Scripted) -> None:
    scripted.answers[("GET", "/v1/props")] = INTERIM + answer("200 OK", b"ok", "Content-Type: text/plain")
    pool = BackendPool(scripted.url, 1)
    try:
        for _ in range(2):  # and the connection, read to its end, serves the next request
            resp = await pool.request("GET", "/v1/props")
            assert (resp.status, resp.content_type) == (200, "text/plain")
            assert await resp.read() == b"ok"
            assert "Link" not in (resp.headers or {})  # an interim head's headers are not the answer's
    finally:
        pool.close()
    assert len(scripted.seen) == 2


async def test_the_gateway_answers_with_the_final_status_after_1xx(
        scripted: Scripted, scripted_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    scripted.answers[("POST", "/v1/embeddings")] = INTERIM + answer(
        "200 OK", EMBEDDING, "Content-Type: application/json")
    async with http.post(scripted_gateway.url + "/v1/embeddings",
                         json={"input": "a", "model": "tiny"}) as r:
        assert r.status == 200
        assert await r.json() == json.loads(EMBEDDING)
        assert "Link" not in r.headers
