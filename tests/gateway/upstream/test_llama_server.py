"""The gateway in front of the real llama-server with the tiny model (layer 3):
a client that disconnects frees its slot; /metrics counts what clients saw."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai.types.chat import ChatCompletionMessageParam

from backend.argv import ServerSpec
from backend.supervisor import Supervisor
from core import runtime
from tests.support.gateway import Gateway, serve_gateway
from tests.support.metrics import promtool_check, scrape
from tests.support.rawhttp import Client, json_request
from tests.support.service import free_port, llama_server

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a story"}]
# far more than the tiny model generates in a test's lifetime: with context shift
# on, llama-server keeps going until the request is cancelled
ENDLESS = 200_000


class Backend:
    def __init__(self, supervisor: Supervisor, key: str) -> None:
        self.supervisor, self.key = supervisor, key

    @property
    def url(self) -> str:
        return self.supervisor.url

    async def busy_slots(self, http: aiohttp.ClientSession) -> int:
        async with http.get(f"{self.url}/slots",
                            headers={"Authorization": f"Bearer {self.key}"}) as r:
            assert r.status == 200
            slots: list[dict[str, Any]] = await r.json()
        return sum(1 for s in slots if s["is_processing"])


@pytest.fixture
async def backend(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Backend]:
    key = secrets.token_urlsafe(16)
    key_file = tmp_path / "backend.key"
    runtime.write_secret(key_file, key)
    spec = ServerSpec(binary=llama_server(), model_path=tiny_model, alias="tiny", port=free_port(),
                      api_key_file=key_file, ctx=4096, parallel=2,
                      extra_args=("--context-shift",))
    supervisor = Supervisor(spec, start_timeout=60, stop_grace=5)
    await supervisor.start()
    try:
        yield Backend(supervisor, key)
    finally:
        await supervisor.stop()


@pytest.fixture
async def gateway(backend: Backend) -> AsyncIterator[Gateway]:
    # CTX 0 (the model's own context, unknown to the gateway): this backend generates past its
    # context (--context-shift), and the tests ask for ENDLESS tokens, over CTX's bound
    async with serve_gateway(backend.url, {"CTX": "0"}, models=("tiny",),
                             backend_key=backend.key) as gw:
        yield gw


async def _wait_busy(backend: Backend, http: aiohttp.ClientSession, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while await backend.busy_slots(http) == 0:
        assert time.monotonic() < deadline, "llama-server never started the generation"
        await asyncio.sleep(0.01)  # poll period of a deadline wait


async def _hang_up_and_see_the_slot_freed(client: Client, backend: Backend, gateway: Gateway,
                                          http: aiohttp.ClientSession) -> None:
    await _wait_busy(backend, http)
    dropped = await client.drop()
    while await backend.busy_slots(http):
        assert time.monotonic() - dropped < 1.0, "the slot was still busy 1 s after the disconnect"
        await asyncio.sleep(0.01)  # poll period of a deadline wait
    assert gateway.state.admission.in_flight == 0


async def test_stream_disconnect_frees_the_slot_within_a_second(
        backend: Backend, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    client = await Client.sending(gateway.url, json_request(
        "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": ENDLESS, "stream": True}))
    assert b" 200 " in await client.read_head(30)
    await client.read_until(b"\n\n", 30)  # tokens are flowing
    await _hang_up_and_see_the_slot_freed(client, backend, gateway, http)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "once upon a time"}),
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/responses", {"input": "once upon a time"}),  # llama-server's OpenAI Responses API
])
async def test_non_stream_disconnect_frees_the_slot_within_a_second(
        backend: Backend, gateway: Gateway, http: aiohttp.ClientSession,
        path: str, body: dict[str, Any]) -> None:
    # llama-server itself checks a non-streaming client only after a silent second on its
    # result queue; the gateway fetches these as streams (gateway/upstream/fold.py), which
    # llama-server checks at every token
    cap = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    client = await Client.sending(gateway.url, json_request(path, {**body, cap: ENDLESS}))
    await _hang_up_and_see_the_slot_freed(client, backend, gateway, http)


async def _direct_and_through(backend: Backend, gateway: Gateway, http: aiohttp.ClientSession,
                              path: str, request: dict[str, Any]) -> tuple[Any, Any]:
    """The same request's answer from llama-server itself, then through the gateway."""
    async with http.post(f"{backend.url}{path}", json=request,
                         headers={"Authorization": f"Bearer {backend.key}"}) as r:
        assert r.status == 200
        direct = await r.json()
    async with http.post(f"{gateway.url}{path}", json=request) as r:
        assert r.status == 200 and r.content_type == "application/json"
        through = await r.json()
    return direct, through


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "once upon a time"}),
    ("/v1/completions", {"prompt": ["one", "two"]}),
])
async def test_non_stream_answers_are_what_llama_server_sends(
        backend: Backend, gateway: Gateway, http: aiohttp.ClientSession,
        path: str, body: dict[str, Any]) -> None:
    """The body rebuilt from the stream equals llama-server's own non-streaming body, but for
    what differs between any two runs (ids, times, speed, cache hits)."""
    request = {**body, "max_tokens": 100, "temperature": 0, "seed": 7}  # ≥ 64: fetched as a stream

    def comparable(answer: dict[str, Any]) -> dict[str, Any]:
        varying = ("id", "created", "timings")
        out = {k: v for k, v in answer.items() if k not in varying}
        out["usage"] = {k: v for k, v in answer["usage"].items() if k != "prompt_tokens_details"}
        return out

    direct, through = await _direct_and_through(backend, gateway, http, path, request)
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    if prompts > 1:
        # llama-server's own body counts one prompt's tokens; the gateway's all of them, as
        # OpenAI's does (and meters them)
        usage = through["usage"]
        assert usage["completion_tokens"] == 100 * prompts
        assert usage["prompt_tokens"] > direct["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        through["usage"] = direct["usage"]
    assert comparable(through) == comparable(direct)
    assert set(through) == set(direct)
    assert through["usage"]["completion_tokens"] == 100


@pytest.mark.parametrize("path,body", [
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 100}),
    ("/v1/responses", {"input": "once upon a time", "max_output_tokens": 100}),
])
async def test_other_apis_non_stream_answers_are_what_llama_server_sends(
        backend: Backend, gateway: Gateway, http: aiohttp.ClientSession,
        path: str, body: dict[str, Any]) -> None:
    """Anthropic Messages answers pass through; OpenAI Responses ones, fetched as streams,
    are rebuilt as llama-server answers them (but for ids, times, and how the prompt split
    over the cache)."""
    request = {**body, "model": "tiny", "temperature": 0, "seed": 7}

    def comparable(answer: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in answer.items() if k not in ("id", "created_at", "completed_at")}
        usage = out.pop("usage")
        prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
        out["tokens"] = (prompt, usage["output_tokens"])
        for item in out.get("output", []):
            item.pop("id", None)
        return out

    direct, through = await _direct_and_through(backend, gateway, http, path, request)
    assert comparable(through) == comparable(direct)
    assert set(through) == set(direct)
    assert comparable(through)["tokens"][1] == 100


async def test_metrics_count_what_clients_saw(backend: Backend, gateway: Gateway,
                                              http: aiohttp.ClientSession) -> None:
    async with gateway.sdk() as client:
        plain = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5)
        with_usage = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=7, stream=True,
            stream_options={"include_usage": True})
        usage_chunks = [c.usage async for c in with_usage if c.usage is not None]
        # no usage asked for: the gateway counts from llama-server's final `timings`
        # event, and must not add a usage chunk the client did not ask for
        bare = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4,
                                                    stream=True)
        bare_chunks = [c async for c in bare]
        text = await client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    assert plain.usage is not None and text.usage is not None
    [streamed] = usage_chunks
    assert all(c.usage is None for c in bare_chunks)
    seen_prompt = (plain.usage.prompt_tokens + streamed.prompt_tokens
                   + plain.usage.prompt_tokens  # same messages, same prompt tokens
                   + text.usage.prompt_tokens)
    seen_completion = (plain.usage.completion_tokens + streamed.completion_tokens + 4
                       + text.usage.completion_tokens)
    assert seen_completion == 5 + 7 + 4 + 3  # the tiny model always runs to max_tokens

    body, samples = await scrape(http, gateway.url)
    key = {"model": "tiny", "key_id": "-"}
    assert samples.get_value("llamagate_prompt_tokens_total", **key) == seen_prompt
    assert samples.get_value("llamagate_completion_tokens_total", **key) == seen_completion
    assert samples.get_value("llamagate_requests_total", ended="completed", route="/v1/chat/completions",
                             status="200", **key) == 3
    assert samples.get_value("llamagate_requests_total", ended="completed", route="/v1/completions",
                             status="200", **key) == 1
    # the two streams; short non-streaming answers come whole, with no first token to time
    assert samples.get_value("llamagate_time_to_first_token_seconds_count", model="tiny") == 2
    assert samples.get_value("llamagate_queue_wait_seconds_count") == 4
    assert samples.get_value("llamagate_in_flight_requests") == 0
    assert samples.get_value("llamagate_queue_depth") == 0
    assert samples.get_value("llamagate_backend_up") == 1
    # llama-server's own counters, labelled with the model, agree with the clients
    assert samples.get_value("llamacpp_tokens_predicted_total", model="tiny") == seen_completion
    assert samples.get_value("llamacpp_requests_processing", model="tiny") == 0
    promtool_check(body)

    async with http.get(gateway.url + "/metrics", headers={"Accept": "application/json"}) as r:
        assert r.content_type == "application/json"
        families = await r.json()
    assert families["llamacpp_tokens_predicted"]["samples"][0]["labels"] == {"model": "tiny"}
    assert sum(s["value"] for s in families["llamagate_completion_tokens"]["samples"]
               if s["name"] == "llamagate_completion_tokens_total") == seen_completion


async def test_other_apis_are_metered_as_the_openai_ones(backend: Backend, gateway: Gateway,
                                                         http: aiohttp.ClientSession) -> None:
    """llama-server's Anthropic Messages and OpenAI Responses endpoints run the same
    models: their tokens are counted (from their own usage forms) like the others'."""
    prompt = completion = 0
    # greedy: llama-server leaves out message_start (and its input tokens) when the first
    # token is part of a UTF-8 character, which a sampled token from the tiny model can be
    anthropic = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    async with http.post(gateway.url + "/v1/messages", json=anthropic) as r:
        assert r.status == 200
        usage = (await r.json())["usage"]
    prompt += usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
    completion += usage["output_tokens"]
    async with http.post(gateway.url + "/v1/messages", json={**anthropic, "stream": True}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = [json.loads(line[5:]) for line in (await r.text()).splitlines()
                  if line.startswith("data:")]
    start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
    prompt += start["input_tokens"] + start.get("cache_read_input_tokens", 0)
    completion += next(e for e in events if e["type"] == "message_delta")["usage"]["output_tokens"]
    async with gateway.sdk() as client:
        answer = await client.responses.create(model="tiny", input="hello", max_output_tokens=4)
        assert answer.usage is not None
        prompt += answer.usage.input_tokens
        completion += answer.usage.output_tokens
        stream = await client.responses.create(model="tiny", input="hello", max_output_tokens=3,
                                               stream=True)
        done = [e async for e in stream if e.type == "response.completed"]
    [final] = done
    assert final.response.usage is not None
    prompt += final.response.usage.input_tokens
    completion += final.response.usage.output_tokens
    assert completion == 5 + 5 + 4 + 3  # the tiny model always runs to its cap

    _, samples = await scrape(http, gateway.url)
    key = {"model": "tiny", "key_id": "-"}
    assert samples.get_value("llamagate_prompt_tokens_total", **key) == prompt
    assert samples.get_value("llamagate_completion_tokens_total", **key) == completion
    for route in ("/v1/messages", "/v1/responses"):
        assert samples.get_value("llamagate_requests_total", route=route, status="200", **key,
                                 ended="completed") == 2


async def test_aliases_answer_as_the_v1_routes(backend: Backend, gateway: Gateway,
                                               http: aiohttp.ClientSession) -> None:
    """The `/v1`-less paths llama-server routes as its `/v1` ones answer as the `/v1` routes;
    its /completions is its native /completion (issue 26: answered as llama-server does)."""
    url = gateway.url
    async with http.get(url + "/models") as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"]
        listing = await r.json()
    async with http.get(url + "/v1/models") as r:
        assert listing == await r.json()
    async with http.post(url + "/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as r:
        assert r.status == 200
        chat = await r.json()
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 3
    async with http.post(url + "/completions", json={"prompt": "once", "n_predict": 3}) as r:
        assert r.status == 200
        completion = await r.json()
    assert completion["stop"] is True and completion["tokens_predicted"] == 3
    _, samples = await scrape(http, url)
    assert samples.total("llamagate_requests_total", route="/v1/chat/completions",
                         status="200") == 1
    assert samples.total("llamagate_requests_total", route="/completions", status="200") == 1
    # both metered: 3 tokens each, from the usage and from the native timings
    assert samples.total("llamagate_completion_tokens_total") == 6
