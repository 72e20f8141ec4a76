"""The proxy in front of a misbehaving backend: pass-through of bytes and errors,
timeouts, cancellation of backend work when the client leaves."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.errors import error_type
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import BACKEND_KEY, FakeLlama, error_body
from tests.support.gateway import Gateway, assert_openai_error, serve_gateway, sse_data
from tests.support.metrics import scrape
from tests.support.rawhttp import Client, json_request
from tests.support.wait import wait_until

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def test_body_is_forwarded_byte_for_byte_with_the_backend_key(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    # max_tokens 3: under STREAM_TO_BACKEND_MIN_TOKENS, so it goes as it came
    raw = b'{ "messages" : [{"role":"user","content":"h\\u00e9"}],  "max_tokens":3, "x_extra":[1] }'
    async with http.post(gateway.url + CHAT + "?trace=1", data=raw,
                         headers={"Content-Type": "application/json",
                                  "Authorization": "Bearer client-key"}) as r:
        assert r.status == 200
        reply = await r.json()
    assert reply["usage"]["completion_tokens"] == 3
    [seen] = fake.requests(CHAT)
    assert seen.body == raw
    assert seen.headers["Authorization"] == f"Bearer {BACKEND_KEY}"  # never the client's key
    assert seen.headers["X-Request-ID"] == r.headers["X-Request-ID"]


async def test_a_non_streaming_completion_is_fetched_as_a_stream_and_answered_whole(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    # see gateway/upstream/fold.py: a stream is what lets a disconnect stop llama-server at once
    raw = b'{"messages": [{"role": "user", "content": "h\\u00e9"}], "max_tokens": 70, "x_extra": [1]}'
    async with http.post(gateway.url + CHAT, data=raw,
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        reply = await r.json()
    [seen] = fake.requests(CHAT)
    # the model it was routed to is named, so a router-mode backend knows it too
    assert json.loads(seen.body) == {**json.loads(raw), "model": "tiny", "stream": True,
                                     "stream_options": {"include_usage": True}}
    assert seen.headers["Authorization"] == f"Bearer {BACKEND_KEY}"
    assert reply["object"] == "chat.completion"
    text = "".join(f"t{i}" for i in range(70))
    assert reply["choices"] == [{"index": 0, "finish_reason": "length",
                                 "message": {"role": "assistant", "content": text}}]
    assert reply["usage"]["completion_tokens"] == 70 and "timings" in reply


async def test_other_v1_routes_pass_through(gateway: Gateway, fake: FakeLlama,
                                            http: aiohttp.ClientSession) -> None:
    async with gateway.sdk() as client:
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        emb = await client.embeddings.create(model="tiny", input="x")
    assert emb.data[0].embedding == [0.25, -0.5, 0.125]
    async with http.get(gateway.url + "/v1/no-such-thing") as r:
        assert r.status == 404  # llama-server's own 404, its numeric code made a string
        assert await r.json() == relayed(404, "File Not Found")


def relayed(status: int, message: str) -> dict[str, Any]:
    """llama-server's error as the gateway relays it: status, message and type kept, its
    numeric code the gateway's string code (its own type's, or its status's)."""
    error = error_body(status, message)["error"]
    code = {501: "not_supported", 503: "backend_unavailable"}.get(status) or error_type(status)[1]
    return {"error": {**error, "code": code, "param": None}}


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_backend_error_status_passes_through_unchanged(gateway: Gateway, fake: FakeLlama,
                                                             http: aiohttp.ClientSession,
                                                             status: int) -> None:
    fake.switches.status = status
    for stream in (False, True):
        async with http.post(gateway.url + CHAT,
                             json={"messages": MESSAGES, "stream": stream}) as r:
            assert r.status == status
            assert r.content_type == "application/json"
            # what llama-server (here the fake's json_response) wrote, but for its numeric
            # code (issue 21: the documented schema's code is a string)
            assert await r.json() == relayed(status, fake.switches.error_message)
            assert r.headers["X-Request-ID"]


async def test_backend_errors_map_to_sdk_exceptions(gateway: Gateway, fake: FakeLlama) -> None:
    async with gateway.sdk() as client:
        fake.switches.status = 400
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="tiny", messages=MESSAGES)
        fake.switches.status = 500
        with pytest.raises(openai.InternalServerError) as broken:
            await client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert bad.value.message.endswith(fake.switches.error_message)
    assert broken.value.status_code == 500


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_the_wrong_method_on_an_inference_route_is_405(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession, method: str) -> None:
    for path in (CHAT, COMPLETIONS, "/v1/embeddings", "/chat/completions"):
        async with http.request(method, gateway.url + path) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST", path
            assert r.headers["X-Request-ID"]
            assert_openai_error(await r.json(), "invalid_request_error", "method_not_allowed")
    assert fake.seen == []


async def test_a_served_model_can_be_retrieved(gateway: Gateway, fake: FakeLlama) -> None:
    async with gateway.sdk() as client:
        model = await client.models.retrieve("tiny")
        assert (model.id, model.object) == ("tiny", "model")
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("nope")
    assert info.value.code == "model_not_found"
    assert fake.requests("/v1/models/tiny") == []  # answered by the gateway


async def test_a_model_whose_name_holds_a_slash_can_be_retrieved(fake: FakeLlama) -> None:
    # the SDK sends "org/m" as /v1/models/org%2Fm; an external llama-server's ids are paths
    async with serve_gateway(fake.url, {}, models=("org/m", "/models/x.gguf")) as gateway, \
            gateway.sdk() as client:
        for name in ("org/m", "/models/x.gguf"):
            assert (await client.models.retrieve(name)).id == name
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("org/other")


async def test_timeout_is_504_and_cancels_backend_work(gateway: Gateway, fake: FakeLlama,
                                                       http: aiohttp.ClientSession) -> None:
    fake.switches.hang_before_headers = True
    started = time.monotonic()
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a"},
                         headers={"X-Request-Timeout": "1"}) as r:
        assert r.status == 504
        assert r.headers["X-Request-ID"] and r.content_type == "application/json"
        error = assert_openai_error(await r.json(), "timeout", "upstream_timeout")
    assert 1 <= time.monotonic() - started < 3
    assert "1s" in error["message"]
    [seen] = fake.requests(COMPLETIONS)
    await wait_until(seen.finished.is_set, "the backend request to end", within=2)
    assert seen.client_closed  # the gateway hung up: llama-server would free the slot
    assert gateway.state.admission.in_flight == 0


async def test_request_timeout_setting_applies_and_sdk_sees_a_server_error(
        start_gateway: StartGateway, fake: FakeLlama) -> None:
    gateway = await start_gateway(REQUEST_TIMEOUT="1")
    fake.switches.hang_before_headers = True
    async with gateway.sdk() as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


async def test_stream_timeout_ends_with_an_error_event(gateway: Gateway, fake: FakeLlama,
                                                       http: aiohttp.ClientSession) -> None:
    fake.switches.hang_after = 2  # two events, then silence
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True},
                         headers={"X-Request-Timeout": "1"}) as r:
        assert r.status == 200
        events = sse_data(await r.text())  # ends: the gateway closes the stream
    assert len(events) == 3
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["t0", "t1"]
    assert_openai_error(json.loads(events[-1]), "timeout", "upstream_timeout")
    [seen] = fake.requests(CHAT)
    await wait_until(seen.finished.is_set, "the backend stream to end", within=2)
    assert seen.client_closed


@pytest.mark.parametrize("cut", ["timeout", "backend_death"])
async def test_a_stream_cut_in_the_middle_of_an_event_ends_with_a_whole_error_event(
        gateway: Gateway, fake: FakeLlama, cut: str) -> None:
    """Half an event was relayed when the stream was cut: the error event must not be
    glued to it (the SDK failed to parse such a stream: JSONDecodeError, not APIError)."""
    fake.switches.torn = True
    if cut == "timeout":
        fake.switches.hang_after = 2
    else:
        fake.switches.die_after = 2
    async with gateway.sdk(timeout=10) as client:
        stream = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True,
            extra_headers={"X-Request-Timeout": "1"})
        contents = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                contents.append(chunk.choices[0].delta.content)
    assert contents == ["t0", "t1"]  # the whole events; the torn one never reached the client
    assert ("timeout" if cut == "timeout" else "backend") in str(info.value)


async def test_backend_dying_mid_stream_ends_the_stream_with_an_error_event(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    fake.switches.die_after = 2
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True},
                         timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        events = sse_data(await r.text())  # returns: the stream ended properly
    assert len(events) == 3
    error = assert_openai_error(json.loads(events[-1]), "server_error", "backend_disconnected")
    assert "backend" in error["message"]
    # the SDK surfaces the final event as an error rather than hanging
    async with gateway.sdk(timeout=10) as client:
        stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
    assert "backend" in str(info.value)
    assert gateway.state.admission.in_flight == 0
    # both were answered 200; what alerting can see is that they ended early. The record is
    # written once the cut request's prompt is counted (gateway/upstream/cut.py), which can
    # be after the client has read the error event
    async def recorded() -> Any:
        _, samples = await scrape(http, gateway.url)
        return samples if samples.get_value("llamagate_responses_cut_short_total", route=CHAT,
                                            reason="backend_stream_error") == 2 else None

    samples = await wait_until(recorded, "both cut streams to be recorded", within=5)
    assert samples.get_value("llamagate_requests_total", ended="backend_failed", route=CHAT,
                             status="200", model="tiny", key_id="-") == 2


async def test_a_backend_refusing_the_gateways_key_is_not_the_clients_fault(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    fake.switches.status = 401  # as llama-server answers a wrong BACKEND_API_KEY
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "max_tokens": 3}) as r:
        assert r.status == 502 and r.headers["X-Request-ID"]
        error = assert_openai_error(await r.json(), "server_error", "backend_auth_failed")
    assert "backend key" in error["message"]
    async with gateway.sdk() as client:  # not AuthenticationError: the client's key is fine
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert info.value.status_code == 502


async def test_backend_dying_before_the_first_event(gateway: Gateway, fake: FakeLlama,
                                                    http: aiohttp.ClientSession) -> None:
    fake.switches.die_after = 0
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True},
                         timeout=aiohttp.ClientTimeout(total=10)) as r:
        events = sse_data(await r.text())
    assert len(events) == 1
    assert_openai_error(json.loads(events[0]), "server_error", "backend_disconnected")


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_backend_request(gateway: Gateway, fake: FakeLlama,
                                                             stream: bool) -> None:
    if stream:
        fake.switches.hang_after = 1  # one event sent, then the generation "runs on"
    else:
        fake.switches.hang_before_headers = True
    client = await Client.sending(gateway.url, json_request(CHAT, {"messages": MESSAGES, "stream": stream}))
    [seen] = await fake.wait_for_requests(1, CHAT)
    if stream:
        await client.read_until(b"\n\n")  # the first event has reached the client
    dropped = await client.drop()
    await wait_until(seen.finished.is_set, "the backend request to be dropped", within=1)
    assert seen.client_closed and seen.closed_at is not None
    assert seen.closed_at - dropped < 0.5
    await wait_until(lambda: gateway.state.admission.in_flight == 0, "the slot to be released", within=1)


async def test_sdk_client_timeout_cancels_the_backend_request(gateway: Gateway,
                                                              fake: FakeLlama) -> None:
    fake.switches.hang_before_headers = True
    async with gateway.sdk(timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.completions.create(model="tiny", prompt="a", max_tokens=2)
    [seen] = fake.requests(COMPLETIONS)
    await wait_until(seen.finished.is_set, "the backend request to be dropped", within=1)
    assert seen.client_closed


async def test_backend_not_ready_is_503_with_retry_after(gateway: Gateway, fake: FakeLlama,
                                                         http: aiohttp.ClientSession) -> None:
    fake.switches.health_status = 503
    await wait_until(lambda: not gateway.state.upstream.status.ready, "the health poll", within=3)
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a"}) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert_openai_error(await r.json(), "service_unavailable", "backend_unavailable")
    assert fake.requests(COMPLETIONS) == []
