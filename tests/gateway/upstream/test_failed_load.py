"""Multi-model: the request that finds its model unloadable (llama-server's router answers
500 "failed to load") is served like the requests after it, which meet the cooldown: by the
profile's fallback, or a 503 with Retry-After (gateway/upstream/proxy.py, _after_failed_load).

The fake answers as the router does; the catalog is given the states serve would publish."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error

MODELS = ("broken", "alpha", "nofb", "loop-a", "loop-b")
CHAT = "/v1/chat/completions"


@pytest.fixture
async def routed(start_gateway: StartGateway, fake: FakeLlama) -> Gateway:
    gateway = await start_gateway(MODEL_COOLDOWN_SECONDS="30")
    catalog = gateway.state.models
    catalog.names, catalog.mode = MODELS, "router"
    catalog.states = {
        "broken": {"state": "unloaded", "fallback": "alpha"},
        "alpha": {"state": "loaded", "fallback": None},
        "nofb": {"state": "unloaded", "fallback": None},
        "loop-a": {"state": "unloaded", "fallback": "loop-b"},
        "loop-b": {"state": "unloaded", "fallback": "loop-a"},
    }
    fake.switches.unloadable = frozenset({"broken", "nofb", "loop-a", "loop-b"})
    return gateway


def body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def models_sent(fake: FakeLlama) -> list[str]:
    return [seen.json()["model"] for seen in fake.requests(CHAT)]


@pytest.mark.parametrize("extra", [
    {"max_tokens": 4},  # forwarded as it came
    {},  # no max_tokens: fetched as a stream and answered as one body (gateway/upstream/fold.py)
])
async def test_the_fallback_answers_the_request_that_found_the_model_broken(
        routed: Gateway, fake: FakeLlama, http: aiohttp.ClientSession,
        extra: dict[str, object]) -> None:
    async with http.post(routed.url + CHAT, json=body("broken", **extra)) as r:
        assert r.status == 200, await r.text()
        assert r.headers["X-Model-Fallback"] == "alpha"
        assert (await r.json())["object"] == "chat.completion"
    assert models_sent(fake) == ["broken", "alpha"]
    second = fake.requests(CHAT)[1].json()
    assert bool(second.get("stream")) is (extra == {})  # the same form as the first
    assert routed.state.models.used["alpha"] > 0  # the fleet learns the fallback was used


async def test_a_stream_is_answered_by_the_fallback(routed: Gateway, fake: FakeLlama,
                                                    http: aiohttp.ClientSession) -> None:
    async with http.post(routed.url + CHAT, json=body("broken", stream=True)) as r:
        assert r.status == 200
        assert r.headers["X-Model-Fallback"] == "alpha"
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert (await r.read()).rstrip().endswith(b"data: [DONE]")
    assert models_sent(fake) == ["broken", "alpha"]


@pytest.mark.parametrize(("model", "sent"), [
    ("nofb", ["nofb"]),  # no fallback
    ("loop-a", ["loop-a", "loop-b"]),  # the fallback fails too, and leads back
])
async def test_without_a_working_fallback_it_is_a_503_naming_the_model_asked_for(
        routed: Gateway, fake: FakeLlama, http: aiohttp.ClientSession,
        model: str, sent: list[str]) -> None:
    async with http.post(routed.url + CHAT, json=body(model, max_tokens=4)) as r:
        assert r.status == 503
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        assert "X-Model-Fallback" not in r.headers
        error = await r.json()
    assert_openai_error(error, "service_unavailable", "model_unavailable")
    assert f"'{model}' failed to load" in error["error"]["message"]
    assert models_sent(fake) == sent


async def test_any_other_500_is_passed_on(routed: Gateway, fake: FakeLlama,
                                          http: aiohttp.ClientSession) -> None:
    fake.switches.status = 500
    fake.switches.error_message = "the model crashed while decoding"
    async with http.post(routed.url + CHAT, json=body("broken", max_tokens=4)) as r:
        assert r.status == 500
        assert "X-Model-Fallback" not in r.headers
        assert json.loads(await r.read())["error"]["message"] == "the model crashed while decoding"
    assert len(fake.requests(CHAT)) == 1
