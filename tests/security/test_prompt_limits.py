"""What one request may cost (issue 21, bug 5): a chat of 300,000 empty messages (8.7 MB,
under the body limit) kept llama-server tokenizing for minutes after its client left. The
gateway bounds a request before it reaches the backend: MAX_MESSAGES (400), the prompt's
bytes (MAX_PROMPT_BYTES, 413), its estimated tokens (bytes / 4) against the context (CTX,
400 context_length_exceeded), and max_tokens ≤ the context (400); each error names the
limit and its `param`."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, serve_gateway

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SETTINGS = {"MAX_MESSAGES": "1000", "MAX_PROMPT_BYTES": "8192", "CTX": "1024"}


@pytest.fixture
async def gateway(fake: FakeLlama) -> AsyncIterator[Gateway]:
    async with serve_gateway(fake.url, SETTINGS) as gw:
        yield gw


async def _post(gateway: Gateway, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + path, data=io.BytesIO(json.dumps(body).encode()),
            headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def test_300000_empty_messages_are_refused_at_once_and_never_forwarded(
        fake: FakeLlama) -> None:
    async with serve_gateway(fake.url, {}) as gateway:  # the default MAX_MESSAGES
        messages = [{"role": "user", "content": ""}] * 300_000
        started = time.monotonic()
        status, body = await _post(gateway, CHAT, {"model": "tiny", "messages": messages})
        took = time.monotonic() - started
    assert status == 400, body
    error = assert_openai_error(body, "invalid_request_error", "too_many_messages")
    assert error["param"] == "messages" and "4096" in error["message"]
    assert took < 5, took  # the parse, and one len(): no walk over 300,000 messages
    assert fake.seen == []


async def test_messages_up_to_the_limit_pass_and_one_more_is_refused(fake: FakeLlama) -> None:
    messages = [{"role": "user", "content": "a"}] * 1000
    async with serve_gateway(fake.url, {"MAX_MESSAGES": "1000"}) as gateway:
        assert (await _post(gateway, CHAT, {"model": "tiny", "messages": messages}))[0] == 200
        status, body = await _post(gateway, CHAT, {"model": "tiny",
                                                   "messages": messages + messages[:1]})
    assert status == 400
    assert assert_openai_error(body, "invalid_request_error", "too_many_messages")["param"] \
        == "messages"
    assert len(fake.seen) == 1


@pytest.mark.parametrize(("path", "field", "value"), [
    (CHAT, "messages", [{"role": "user", "content": "é" * 4100}, {"role": "user", "content": "a"}]),
    (CHAT, "messages", [{"role": "user", "content": [{"type": "text", "text": "x" * 9000}]}]),
    (COMPLETIONS, "prompt", "x" * 9000),
    (COMPLETIONS, "prompt", ["x" * 5000, "y" * 5000]),
    ("/v1/embeddings", "input", "x" * 9000),
])
async def test_a_prompt_over_max_prompt_bytes_is_413(
        gateway: Gateway, fake: FakeLlama, path: str, field: str, value: Any) -> None:
    status, body = await _post(gateway, path, {"model": "tiny", field: value})
    assert status == 413, body
    error = assert_openai_error(body, "invalid_request_error", "prompt_too_large")
    assert error["param"] == field and "8192" in error["message"]
    assert fake.seen == []


async def test_a_prompt_whose_estimated_tokens_pass_the_context_is_refused(
        gateway: Gateway, fake: FakeLlama) -> None:
    # 6,000 bytes: about 1,500 tokens at 4 bytes a token, over CTX 1024, under 8 KiB
    status, body = await _post(gateway, COMPLETIONS, {"model": "tiny", "prompt": "x" * 6000})
    assert status == 400, body
    error = assert_openai_error(body, "invalid_request_error", "context_length_exceeded")
    assert error["param"] == "prompt" and "1024" in error["message"]
    # an image's data is not text: it does not count as prompt bytes
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 7000}}
    status, body = await _post(gateway, CHAT, {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]})
    assert status == 200, body
    assert len(fake.seen) == 1


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n_predict"])
async def test_max_tokens_above_the_context_is_refused(
        gateway: Gateway, fake: FakeLlama, field: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    status, body = await _post(gateway, CHAT, {"model": "tiny", "messages": messages,
                                               field: 1025})
    assert status == 400, body
    error = assert_openai_error(body, "invalid_request_error", "context_length_exceeded")
    assert error["param"] == field and "1024" in error["message"]
    assert (await _post(gateway, CHAT, {"model": "tiny", "messages": messages,
                                        field: 1024}))[0] == 200
    assert len(fake.seen) == 1
