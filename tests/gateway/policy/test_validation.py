"""Requests the gateway refuses before they reach the backend: each answer is
OpenAI-shaped JSON with the right status, and the SDK raises its matching class. And those
it no longer refuses (issue 26: what llama-server accepts, or refuses itself, goes on to it;
tests/serving/test_drop_in.py shows each refusal here is llama-server's status too)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.errors import BadRequest
from gateway.policy.validation import MAX_TOKENS_CAP, validate
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, serve_gateway

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
MESSAGES_API, RESPONSES, RERANK = "/v1/messages", "/v1/responses", "/v1/rerank"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _raw(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


BAD_BODIES = [
    # (route, body, code, param)
    (CHAT, b"{not json", "invalid_json", None),
    (CHAT, b"\xff\xfe", "invalid_json", None),
    (CHAT, [1, 2], "invalid_json", None),
    (CHAT, {"model": "tiny"}, "invalid_request", "messages"),
    (CHAT, {"messages": "hi"}, "invalid_request", "messages"),
    (COMPLETIONS, {"max_tokens": 3}, "invalid_request", "prompt"),
    (EMBEDDINGS, {"model": "tiny"}, "invalid_request", "input"),
    (CHAT, {"messages": MESSAGES, "max_tokens": -5}, "invalid_request", "max_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": "16"}, "invalid_request", "max_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": MAX_TOKENS_CAP + 1}, "invalid_request", "max_tokens"),
    (COMPLETIONS, {"prompt": "a", "n_predict": "2"}, "invalid_request", "n_predict"),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": [1]}, "invalid_request",
     "max_completion_tokens"),
    (CHAT, {"messages": MESSAGES, "stream": "yes"}, "invalid_request", "stream"),
    (CHAT, {"messages": MESSAGES, "n": 0}, "invalid_request", "n"),
    (CHAT, {"messages": MESSAGES, "n": "2"}, "invalid_request", "n"),
    # NaN and Infinity are not JSON (Python's parser takes them, llama-server's does not)
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "invalid_json", None),
    (COMPLETIONS, b'{"prompt": "a", "max_tokens": Infinity}', "invalid_json", None),
    (COMPLETIONS, b'{"prompt": "a", "temperature": -1e999}', "invalid_json", None),
    (CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json", None),
    # half a UTF-16 pair, escaped or as raw bytes: llama-server answers a 500 and logs the
    # text around it (the prompt)
    (CHAT, b'{"messages": [{"role": "user", "content": "secret \\ud800"}]}', "invalid_json", None),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udc00 x"}]}', "invalid_json", None),
    (COMPLETIONS, b'{"prompt": "a \xed\xa0\x80"}', "invalid_json", None),
    # llama-server's Anthropic Messages, OpenAI Responses and rerank endpoints
    (MESSAGES_API, {"messages": MESSAGES, "max_tokens": MAX_TOKENS_CAP + 1}, "invalid_request",
     "max_tokens"),
    (MESSAGES_API, {"messages": MESSAGES, "stream": 1}, "invalid_request", "stream"),
    (RESPONSES, {"model": "tiny"}, "invalid_request", "input"),
    (RESPONSES, {"input": "hi", "max_output_tokens": "9"}, "invalid_request",
     "max_output_tokens"),
    (RERANK, {"query": 5, "documents": ["a"]}, "invalid_request", "query"),
    ("/v1/reranking", {"documents": ["a"]}, "invalid_request", "query"),
    # llama-server's native routes
    ("/completion", {"n_predict": 2}, "invalid_request", "prompt"),
    ("/completion", {"prompt": "a", "n_predict": -2}, "invalid_request", "n_predict"),
    ("/completion", {"prompt": "a", "stream": "yes"}, "invalid_request", "stream"),
    ("/completions", {"prompt": "a", "n": 0}, "invalid_request", "n"),
    ("/embedding", {"model": "tiny"}, "invalid_request", "input"),
    ("/rerank", {"query": ["q"], "documents": ["a"]}, "invalid_request", "query"),
    ("/apply-template", {"messages": {"role": "user"}}, "invalid_request", "messages"),
    ("/tokenize", b"{not json", "invalid_json", None),
]

# refused by the gateway before issue 26; llama-server answers them itself (most with a 200)
PASSED_ON = [
    (CHAT, {"messages": []}),
    (CHAT, {"messages": [{"content": "no role"}]}),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}),
    (COMPLETIONS, {"prompt": 5}),
    (COMPLETIONS, {"prompt": []}),
    (EMBEDDINGS, {"input": {"text": "x"}}),
    (EMBEDDINGS, {"content": "llama-server's other name for input"}),
    (CHAT, {"messages": MESSAGES, "max_tokens": 0}),
    (CHAT, {"messages": MESSAGES, "max_tokens": 1.5}),
    (CHAT, {"messages": MESSAGES, "max_tokens": True}),
    (CHAT, {"messages": MESSAGES, "max_tokens": 1, "n": 1.5}),
    (CHAT, {"messages": MESSAGES, "max_tokens": 1, "max_output_tokens": "not read by chat"}),
    (COMPLETIONS, {"prompt": "a", "n_predict": 0}),
    (CHAT, {"messages": MESSAGES, "model": 5, "max_tokens": 1}),
    (MESSAGES_API, {"max_tokens": 4}),
    (MESSAGES_API, {"messages": [], "max_tokens": 4}),
    (MESSAGES_API, {"messages": "hi", "max_tokens": 4}),
    (RESPONSES, {"input": []}),
    (RESPONSES, {"input": 5}),
    (RESPONSES, {"input": "hi", "max_output_tokens": 0}),
    (EMBEDDINGS, {"input": "hi", "stream": "not read by embeddings", "n": 0}),
    ("/completion", {"prompt": "a", "max_tokens": "not read: n_predict is"}),
    ("/tokenize", {}),
]


@pytest.mark.parametrize(("route", "body", "code", "param"), BAD_BODIES)
async def test_bad_body_is_400_and_not_forwarded(gateway: Gateway, fake: FakeLlama,
                                                 http: aiohttp.ClientSession, route: str,
                                                 body: Any, code: str, param: str | None) -> None:
    async with http.post(gateway.url + route, data=_raw(body),
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert r.content_type == "application/json"
        assert r.headers["X-Request-ID"]
        error = assert_openai_error(await r.json(), "invalid_request_error", code)
    assert error["param"] == param
    assert fake.requests(route) == []


@pytest.mark.parametrize(("route", "body"), PASSED_ON)
async def test_what_llama_server_judges_is_forwarded(gateway: Gateway, fake: FakeLlama,
                                                     http: aiohttp.ClientSession, route: str,
                                                     body: dict[str, Any]) -> None:
    async with http.post(gateway.url + route, json=body) as r:
        assert r.status in (200, 404), await r.text()  # the fake's answer (404: no such route)
    [seen] = fake.requests(route)
    assert seen.json().items() >= body.items()  # (a short chat goes as a stream: see fold.py)


def test_validate_accepts_what_it_should() -> None:
    info = validate(CHAT, _raw({"messages": MESSAGES, "model": "tiny", "stream": True,
                                "max_tokens": MAX_TOKENS_CAP, "stream_options": {"include_usage": True}}))
    assert (info.model, info.stream, info.max_tokens) == ("tiny", True, MAX_TOKENS_CAP)
    assert validate(COMPLETIONS, _raw({"prompt": [1, 2, 3], "max_tokens": -1})).max_tokens is None
    assert validate(EMBEDDINGS, _raw({"input": ["a", "b"]})).stream is False
    # the messages' shape is llama-server's to judge
    assert validate(CHAT, _raw({"messages": [{"role": "user", "content": {"x": 1}}]})).n == 1
    with pytest.raises(BadRequest):
        validate(CHAT, _raw({"messages": {"role": "user"}}))
    assert validate(CHAT, _raw({"messages": MESSAGES, "stream": None})).stream is False  # as OpenAI
    # a whole pair, as an ASCII-only encoder escapes an emoji, is one character
    emoji = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert validate(CHAT, emoji).body == {"messages": [{"role": "user", "content": "\U0001f600"}]}
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    info = validate(RESPONSES, _raw({"input": items, "max_output_tokens": 9, "stream": True}))
    assert (info.stream, info.max_tokens) == (True, 9)
    assert validate(MESSAGES_API, _raw({"messages": MESSAGES, "max_tokens": 3})).max_tokens == 3
    assert validate(RERANK, _raw({"query": "q", "texts": ["a"]})).model is None  # TEI's form


async def test_sdk_raises_bad_request_error_for_bad_max_tokens(gateway: Gateway,
                                                               fake: FakeLlama) -> None:
    async with gateway.sdk() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=-5)
    assert info.value.status_code == 400
    assert info.value.code == "invalid_request" and info.value.param == "max_tokens"
    assert info.value.response.headers["X-Request-ID"]
    assert fake.requests(CHAT) == []


async def test_unknown_model_is_404_and_sdk_raises_not_found(fake: FakeLlama,
                                                             http: aiohttp.ClientSession) -> None:
    # several models: an unknown name is a 404 (with one, any name reaches it:
    # tests/gateway/upstream/test_model_aliases.py)
    async with serve_gateway(fake.url, {}, models=("tiny", "small")) as gateway:
        await _unknown_model_is_404(gateway, fake, http)


async def _unknown_model_is_404(gateway: Gateway, fake: FakeLlama,
                                http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + CHAT, json={"model": "nope", "messages": MESSAGES}) as r:
        assert r.status == 404 and r.content_type == "application/json"
        assert r.headers["X-Request-ID"]
        error = assert_openai_error(await r.json(), "invalid_request_error", "model_not_found")
    assert error["param"] == "model" and "tiny" in error["message"]
    async with gateway.sdk() as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found"
    assert fake.requests() == []


async def test_body_over_max_body_bytes_is_413_json(start_gateway: StartGateway, fake: FakeLlama,
                                                    http: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(MAX_BODY_BYTES="2048")
    small = {"prompt": "a" * 1500, "max_tokens": 2}
    async with http.post(gateway.url + COMPLETIONS, json=small) as r:
        assert r.status == 200  # just under the limit: forwarded
    big = {"prompt": "a" * 4000, "max_tokens": 2}
    async with http.post(gateway.url + COMPLETIONS, json=big) as r:
        assert r.status == 413
        assert r.content_type == "application/json"  # not aiohttp's HTML page
        assert r.headers["X-Request-ID"]
        assert_openai_error(await r.json(), "invalid_request_error", "payload_too_large")
    async with gateway.sdk() as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="tiny", prompt="a" * 4000, max_tokens=2)
    assert info.value.status_code == 413 and info.value.code == "payload_too_large"
    assert len(fake.requests(COMPLETIONS)) == 1


@pytest.mark.parametrize("value", ["0", "0.5", "601", "-1", "ten", "nan", "inf", "1_0", "1e1"])
async def test_request_timeout_header_out_of_range_is_400(gateway: Gateway, fake: FakeLlama,
                                                          http: aiohttp.ClientSession,
                                                          value: str) -> None:
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 2},
                         headers={"X-Request-Timeout": value}) as r:
        assert r.status == 400 and r.content_type == "application/json"
        assert r.headers["X-Request-ID"]
        error = assert_openai_error(await r.json(), "invalid_request_error", "invalid_timeout")
    assert "X-Request-Timeout" in error["message"]
    assert fake.requests(COMPLETIONS) == []


@pytest.mark.parametrize("value", ["1", "600", "30.5"])
async def test_request_timeout_header_in_range_is_accepted(gateway: Gateway,
                                                           http: aiohttp.ClientSession,
                                                           value: str) -> None:
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 2},
                         headers={"X-Request-Timeout": value}) as r:
        assert r.status == 200
