"""The `/v1`-less aliases in front of the real llama-server with the tiny model (layer 3):
answered as the `/v1` routes are, OpenAI-shaped, whatever llama-server's own path of
that name answers (its /completions is its native /completion format)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from backend.argv import ServerSpec
from backend.supervisor import Supervisor
from llamagate import runtime
from tests.gateway.support import Gateway, scrape, serve_gateway
from tests.support.service import free_port, llama_server


@pytest.fixture
async def real_gateway(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Gateway]:
    key = secrets.token_urlsafe(16)
    key_file = tmp_path / "backend.key"
    runtime.write_secret(key_file, key)
    spec = ServerSpec(binary=llama_server(), model_path=tiny_model, alias="tiny", port=free_port(),
                      api_key_file=key_file, ctx=1024, parallel=1)
    supervisor = Supervisor(spec, start_timeout=60, stop_grace=5)
    await supervisor.start()
    try:
        gateway = await serve_gateway(supervisor.url, {}, models=("tiny",), backend_key=key)
        try:
            yield gateway
        finally:
            await gateway.stop()
    finally:
        await supervisor.stop()


async def test_aliases_answer_as_the_v1_routes(real_gateway: Gateway,
                                               http: aiohttp.ClientSession) -> None:
    url = real_gateway.url
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
    async with http.post(url + "/completions", json={"prompt": "once", "max_tokens": 3}) as r:
        assert r.status == 200
        completion = await r.json()
    assert completion["object"] == "text_completion" and "choices" in completion
    _, samples = await scrape(http, url)
    assert samples.total("llamagate_requests_total", route="/v1/chat/completions",
                         status="200") == 1
    assert samples.total("llamagate_prompt_tokens_total") > 0  # usage was read: OpenAI-shaped
