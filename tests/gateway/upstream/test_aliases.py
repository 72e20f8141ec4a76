"""The paths without `/v1` that llama-server routes as its `/v1` ones (POST /chat/completions,
/responses, GET /models) are served as their `/v1` routes: the same validation, auth,
limits, metrics route and cancellation. Its /completions and /embeddings are its native
routes, served as such (tests/gateway/upstream/test_native_routes.py); the paths the gateway
does not serve stay unknown to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, sse_data
from tests.support.keytool import KeyTool
from tests.support.metrics import scrape
from tests.support.rawhttp import Client, json_request
from tests.support.wait import wait_until

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
# (/responses too: the fake llama-server has no /v1/responses; tests/serving/test_drop_in.py)
ALIASES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/chat/completions", {"messages": MESSAGES, "max_tokens": 2}),
    ("GET", "/models", None),
]


def _keys(tmp_path: Path) -> KeyTool:
    # where start_gateway's DATA_DIR puts them
    return KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")


@pytest.mark.parametrize(("method", "path", "body"), ALIASES, ids=[p for _, p, _ in ALIASES])
async def test_an_alias_is_answered_as_its_v1_route(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession,
        method: str, path: str, body: dict[str, Any] | None) -> None:
    answers = []
    for url in (gateway.url + path, gateway.url + "/v1" + path):
        async with http.request(method, url, json=body, headers={"X-Request-ID": "alias-1"}) as r:
            assert r.status == 200, await r.text()
            assert r.content_type == "application/json"
            assert r.headers["X-Request-ID"] == "alias-1"
            answers.append(await r.json())
    alias, v1 = answers
    assert alias["object"] == v1["object"] and set(alias) == set(v1)
    if method == "POST":  # forwarded to llama-server's /v1 route, both times
        assert [s.path for s in fake.requests()] == ["/v1" + path] * 2
    else:
        assert alias == v1
    _, samples = await scrape(http, gateway.url)
    assert samples.total("llamagate_requests_total", route="/v1" + path, status="200") == 2


async def test_an_alias_is_validated_as_its_v1_route(gateway: Gateway, fake: FakeLlama,
                                                     http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + "/chat/completions", json={"messages": "hi"}) as r:
        assert r.status == 400
        assert r.headers["X-Request-ID"]
        error = assert_openai_error(await r.json(), "invalid_request_error", "invalid_request")
        assert error["param"] == "messages"
    async with http.post(gateway.url + "/chat/completions",
                         json={"messages": MESSAGES, "stream": "yes"}) as r:
        assert r.status == 400
        error = assert_openai_error(await r.json(), "invalid_request_error", "invalid_request")
        assert error["param"] == "stream"
    assert fake.requests() == []


async def test_an_alias_streams(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + "/chat/completions",
                         json={"messages": MESSAGES, "stream": True}) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        events = sse_data(await r.text())
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


async def test_an_alias_needs_the_inference_scope(start_gateway: StartGateway, tmp_path: Path,
                                                  http: aiohttp.ClientSession) -> None:
    keys = _keys(tmp_path)
    _, inference = keys.generate("app")
    _, metrics_only = keys.generate("scraper", "--scopes", "metrics")
    gateway = await start_gateway(AUTH_ENABLED="true")
    url = gateway.url + "/chat/completions"
    async with http.post(url, json={"messages": MESSAGES}) as r:
        assert r.status == 401
        assert r.headers["X-Request-ID"]
        assert_openai_error(await r.json(), "authentication_error", "missing_api_key")
    async with http.post(url, json={"messages": MESSAGES},
                         headers={"Authorization": f"Bearer {metrics_only}"}) as r:
        assert r.status == 403  # not the 404 of a path the gateway does not serve
        assert_openai_error(await r.json(), "permission_error", "missing_scope")
    async with http.post(url, json={"messages": MESSAGES},
                         headers={"Authorization": f"Bearer {inference}"}) as r:
        assert r.status == 200
        assert (await r.json())["object"] == "chat.completion"
    async with http.get(gateway.url + "/models",
                        headers={"Authorization": f"Bearer {inference}"}) as r:
        assert r.status == 200
        assert (await r.json())["object"] == "list"


async def test_a_client_leaving_an_alias_cancels_the_backend_request(gateway: Gateway,
                                                                     fake: FakeLlama) -> None:
    fake.switches.hang_before_headers = True
    client = await Client.sending(gateway.url, json_request("/chat/completions", {"messages": MESSAGES}))
    try:
        [seen] = await fake.wait_for_requests(1, "/v1/chat/completions")
    finally:
        await client.drop()
    await wait_until(seen.finished.is_set, "the backend request to be dropped", within=2)
    assert seen.client_closed
    await wait_until(lambda: gateway.state.admission.in_flight == 0, "the slot to be released", within=2)


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/lora-adapters"), ("GET", "/lora-adapters"), ("POST", "/slots/0"),
    ("POST", "/models/load"), ("POST", "/api/chat"),
    ("POST", "/chat/completions/"), ("GET", "/models/tiny"),
])
async def test_other_llama_server_paths_stay_unknown(gateway: Gateway, fake: FakeLlama,
                                                     http: aiohttp.ClientSession,
                                                     method: str, path: str) -> None:
    async with http.request(method, gateway.url + path, json={"prompt": "a"}) as r:
        assert r.status == 404
        assert r.headers["X-Request-ID"]
        assert_openai_error(await r.json(), "invalid_request_error", "not_found")
    assert fake.requests() == []


async def test_the_gateway_keeps_its_own_health(gateway: Gateway, fake: FakeLlama,
                                                http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/health") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "healthy"  # the gateway's, not llama-server's
