"""llama-server's errors (issue 21, bug 7): its error JSON carries a numeric `code`
(`{"error": {"code": 400, "message", "type"}}`), which breaks the gateway's documented
error schema (`code` a string). Relayed, its status, message and type are kept; its code
becomes a string of the gateway's vocabulary; its other fields stay."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.security.keyless import gateway_before, keyless_llama_server
from tests.support.gateway import Gateway

pytestmark = pytest.mark.llama_server


@pytest.fixture
async def gateway(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Gateway]:
    async with keyless_llama_server(tmp_path, tiny_model, ctx=256) as url, \
            gateway_before(url) as gw:
        yield gw


async def _post(gateway: Gateway, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + path, data=io.BytesIO(json.dumps(body).encode()),
            headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


def _gateway_shaped(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and "param" in error, error
    return dict(error)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_longer_than_the_context(gateway: Gateway, stream: bool) -> None:
    # BACKEND_URL: the gateway does not know the context; llama-server refuses it
    status, body = await _post(gateway, "/v1/chat/completions", {
        "model": "tiny", "stream": stream, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello " * 2000}]})
    assert status == 400, body
    error = _gateway_shaped(body)
    assert error["type"] == "exceed_context_size_error"  # llama-server's, kept
    assert error["code"] == "context_length_exceeded"  # the gateway's own for the same refusal
    assert error["n_ctx"] == 256  # its other fields stay


async def test_an_endpoint_llama_server_does_not_support(gateway: Gateway) -> None:
    status, body = await _post(gateway, "/v1/embeddings", {"model": "tiny", "input": "hi"})
    assert status == 501, body
    error = _gateway_shaped(body)
    assert error["type"] == "not_supported_error" and error["code"] == "not_supported"
