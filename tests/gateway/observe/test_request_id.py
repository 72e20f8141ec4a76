"""X-Request-ID: taken from the client when sane, generated otherwise, echoed on every
response and passed to the backend."""

from __future__ import annotations

import re

import aiohttp
import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway

COMPLETIONS = "/v1/completions"
BODY = {"prompt": "a", "max_tokens": 2}
GENERATED = re.compile(r"^[0-9a-f]{32}$")


async def test_client_id_is_echoed_and_forwarded(gateway: Gateway, fake: FakeLlama,
                                                 http: aiohttp.ClientSession) -> None:
    for stream in (False, True):
        rid = f"client-id:{stream}.1_a"
        async with http.post(gateway.url + COMPLETIONS, json={**BODY, "stream": stream},
                             headers={"X-Request-ID": rid}) as r:
            assert r.status == 200
            assert r.headers["X-Request-ID"] == rid
            await r.read()
        assert fake.requests(COMPLETIONS)[-1].headers["X-Request-ID"] == rid


@pytest.mark.parametrize("sent", [None, "", "has space", "x" * 129, "semi;colon", "ünï"])
async def test_missing_or_unsafe_id_is_replaced(gateway: Gateway, fake: FakeLlama,
                                                http: aiohttp.ClientSession,
                                                sent: str | None) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    async with http.post(gateway.url + COMPLETIONS, json=BODY, headers=headers) as r:
        rid = r.headers["X-Request-ID"]
    assert GENERATED.match(rid)
    assert fake.requests(COMPLETIONS)[-1].headers["X-Request-ID"] == rid


async def test_generated_ids_differ(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    ids = set()
    for _ in range(3):
        async with http.post(gateway.url + COMPLETIONS, json=BODY) as r:
            ids.add(r.headers["X-Request-ID"])
    assert len(ids) == 3


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/no/such/route", None, 404),
    ("POST", COMPLETIONS, b"{", 400),
    ("GET", "/health", None, 200),
    ("GET", "/metrics", None, 200),
])
async def test_every_response_carries_the_id(gateway: Gateway, http: aiohttp.ClientSession,
                                             method: str, path: str, body: bytes | None,
                                             status: int) -> None:
    async with http.request(method, gateway.url + path, data=body,
                            headers={"X-Request-ID": "every-1"}) as r:
        assert r.status == status
        assert r.headers["X-Request-ID"] == "every-1"
