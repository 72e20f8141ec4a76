"""CORS request and response headers: a preflight from an allowed origin may send the
headers it names (the OpenAI JS SDK's X-Stainless-*, and whatever other SDKs add), as
long as they are plain header names; answers expose the headers a browser client reads."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.typedefs import LooseHeaders
from openai.types.chat import ChatCompletionMessageParam

from gateway.policy.cors import MAX_REQUESTED_NAMES, allow_headers
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error

APP = "https://app.example"
CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
# what the OpenAI JS SDK (v4/v5) names in a browser's preflight, as the browser writes it
STAINLESS = ("authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,"
             "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,"
             "x-stainless-runtime-version,x-stainless-timeout")
EXPOSED = ("x-request-id", "x-model-fallback", "retry-after", "x-ratelimit-limit-requests",
           "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
           "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def _list(headers: LooseHeaders, name: str) -> list[str]:
    values = headers.getall(name, [])  # type: ignore[union-attr]
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _preflight(requested: str | None, origin: str = APP) -> dict[str, str]:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    return headers


@pytest.fixture
async def cors_gateway(start_gateway: StartGateway) -> Gateway:
    # auth on: the preflight is still answered without a key
    return await start_gateway(CORS_ORIGINS=f"{APP}, https://other.example", AUTH_ENABLED="true")


@pytest.mark.parametrize("path", [CHAT, "/chat/completions", "/v1/models"])
async def test_a_preflight_allows_the_headers_the_sdk_sends(
        cors_gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession, path: str) -> None:
    async with http.options(cors_gateway.url + path, headers=_preflight(STAINLESS)) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        allowed = {h.lower() for h in _list(r.headers, "Access-Control-Allow-Headers")}
        assert set(STAINLESS.split(",")) <= allowed
        assert "*" not in allowed  # with credentials a `*` is no wildcard
        assert _list(r.headers, "Vary") == ["Origin", "Access-Control-Request-Headers"]
        assert r.headers["X-Request-ID"]
    assert fake.requests() == []


async def test_the_sdk_request_itself_is_answered_readably(cors_gateway: Gateway,
                                                           http: aiohttp.ClientSession) -> None:
    # no key: the browser must be able to read the 401 and its headers
    headers = {"Origin": APP, "X-Stainless-OS": "MacOS", "X-Stainless-Lang": "js",
               "X-Stainless-Retry-Count": "0", "X-Stainless-Timeout": "600"}
    async with http.post(cors_gateway.url + CHAT, json={"messages": MESSAGES},
                         headers=headers) as r:
        assert r.status == 401
        assert_openai_error(await r.json(), "authentication_error", "missing_api_key")
        assert r.headers["Access-Control-Allow-Origin"] == APP
        exposed = {h.lower() for h in _list(r.headers, "Access-Control-Expose-Headers")}
        assert set(EXPOSED) <= exposed
        assert _list(r.headers, "Vary") == ["Origin"]


async def test_answers_off_the_token_path_expose_the_same_headers(
        cors_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(cors_gateway.url + "/admin/keys", headers={"Origin": APP}) as r:
        assert r.status == 401
        exposed = {h.lower() for h in _list(r.headers, "Access-Control-Expose-Headers")}
        assert set(EXPOSED) <= exposed


@pytest.mark.parametrize("requested", [
    "x-ok, bad(name)",  # not a token
    "x-ok,\r\nx-injected: 1",  # not a token either; aiohttp would refuse the raw CRLF anyway
    "x-ok, x-" + "a" * 2100,  # too long
    ",".join(f"x-h{i}" for i in range(MAX_REQUESTED_NAMES + 1)),  # too many
], ids=["not-a-token", "line-break", "too-long", "too-many"])
def test_names_that_are_not_plain_header_names_are_not_reflected(requested: str) -> None:
    allowed = allow_headers(requested)
    assert "x-ok" not in allowed and "x-h0" not in allowed
    assert "Authorization" in allowed and "Content-Type" in allowed  # the fixed list


def test_requested_names_are_reflected_as_a_clean_list() -> None:
    assert allow_headers(" X-Stainless-OS ,\tauthorization") == "X-Stainless-OS, authorization"
    names = ",".join(f"x-h{i}" for i in range(MAX_REQUESTED_NAMES))
    assert allow_headers(names) == names.replace(",", ", ")
    assert "Authorization" in allow_headers(None) and "Authorization" in allow_headers("")


async def test_a_bad_request_headers_list_gets_the_fixed_list(cors_gateway: Gateway,
                                                              http: aiohttp.ClientSession) -> None:
    async with http.options(cors_gateway.url + CHAT,
                            headers=_preflight("x-stainless-os, bad(name)")) as r:
        assert r.status == 204
        allowed = {h.lower() for h in _list(r.headers, "Access-Control-Allow-Headers")}
        assert "x-stainless-os" not in allowed and "authorization" in allowed


async def test_a_preflight_from_another_origin_allows_nothing(cors_gateway: Gateway,
                                                              http: aiohttp.ClientSession) -> None:
    async with http.options(cors_gateway.url + CHAT,
                            headers=_preflight(STAINLESS, "https://evil.example")) as r:
        assert r.status == 204
        assert not any(h.startswith("Access-Control-") for h in r.headers)
        assert _list(r.headers, "Vary") == ["Origin"]


async def test_a_wildcard_reflects_headers_without_credentials(start_gateway: StartGateway,
                                                               http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(CORS_ORIGINS="*")
    async with http.options(gateway.url + CHAT, headers=_preflight(STAINLESS)) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
        allowed = {h.lower() for h in _list(r.headers, "Access-Control-Allow-Headers")}
        assert "x-stainless-os" in allowed


async def test_cors_off_reflects_nothing(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.options(gateway.url + CHAT, headers=_preflight(STAINLESS)) as r:
        assert not any(h.startswith("Access-Control-") for h in r.headers)
