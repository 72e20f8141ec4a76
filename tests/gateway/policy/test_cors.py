"""CORS: exact origin match, preflight 204 before auth, Vary: Origin, never `*`
with credentials, headers on streamed and error responses too."""

from __future__ import annotations

import aiohttp
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway

APP = "https://app.example"
CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def _vary(headers: aiohttp.typedefs.LooseHeaders) -> list[str]:
    values = headers.getall("Vary", [])  # type: ignore[union-attr]
    return [v.strip() for value in values for v in value.split(",")]


@pytest.fixture
async def cors_gateway(start_gateway: StartGateway) -> Gateway:
    # auth on: a preflight must still be answered (browsers send no credentials on it)
    return await start_gateway(CORS_ORIGINS=f"{APP}, https://other.example", AUTH_ENABLED="true")


async def test_preflight_is_204_without_auth(cors_gateway: Gateway, fake: FakeLlama,
                                             http: aiohttp.ClientSession) -> None:
    async with http.options(cors_gateway.url + CHAT, headers={"Origin": APP, **PREFLIGHT}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        # once each, not once per layer; the allowed headers are the requested ones
        assert _vary(r.headers) == ["Origin", "Access-Control-Request-Headers"]
        assert r.headers["X-Request-ID"]
    assert fake.requests() == []


async def test_origin_must_match_exactly(cors_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    for origin in ("https://evil.example", "https://app.example.evil", "http://app.example",
                   "https://app.example:8443"):
        async with http.options(cors_gateway.url + CHAT,
                                headers={"Origin": origin, **PREFLIGHT}) as r:
            assert r.status == 204
            assert "Access-Control-Allow-Origin" not in r.headers, origin
            assert "Access-Control-Allow-Credentials" not in r.headers
            assert _vary(r.headers) == ["Origin"]


async def test_error_responses_carry_cors_headers(cors_gateway: Gateway,
                                                  http: aiohttp.ClientSession) -> None:
    # auth is on and no key is sent: the browser must be able to read the 401
    async with http.post(cors_gateway.url + CHAT, json={"messages": MESSAGES},
                         headers={"Origin": APP}) as r:
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert "X-Request-ID" in r.headers["Access-Control-Expose-Headers"]
        assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
        assert _vary(r.headers) == ["Origin"]


async def test_streamed_and_plain_responses_carry_cors_headers(start_gateway: StartGateway,
                                                               http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(CORS_ORIGINS=APP)
    for stream in (False, True):
        async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": stream},
                             headers={"Origin": APP}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert _vary(r.headers) == ["Origin"]
            await r.read()
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES},
                         headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 200  # CORS is the browser's business; the server only withholds
        assert "Access-Control-Allow-Origin" not in r.headers
        assert _vary(r.headers) == ["Origin"]


async def test_wildcard_never_comes_with_credentials(start_gateway: StartGateway,
                                                     http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(CORS_ORIGINS="*")
    async with http.options(gateway.url + CHAT, headers={"Origin": APP, **PREFLIGHT}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True},
                         headers={"Origin": APP}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
        await r.read()


async def test_cors_is_off_by_default(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.options(gateway.url + CHAT, headers={"Origin": APP, **PREFLIGHT}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Access-Control-Allow-Methods" not in r.headers
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES},
                         headers={"Origin": APP}) as r:
        assert r.status == 200
        assert not any(h.startswith("Access-Control-") for h in r.headers)
