"""Hidden requests (issue 21, bug 1): the gateway forwarded any method under /v1/*. For an
extension method (PURGE, SEARCH, PROPFIND, QUERY, …) llama-server's HTTP library answers 400
without reading the body, and parses what follows its 4 KiB read window as new requests:
a `POST /completion` hidden in the body ran, unmetered, on a llama-server without a key.

Now /v1/* takes only the methods llama-server routes (GET, HEAD, POST); any other gets 405
with `Allow` from the gateway, and llama-server's own counters show that nothing ran. (A GET's
body, and an answer that comes before its request was sent: tests/gateway/upstream/test_client.py.)
An external llama-server without a key is warned of at startup."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from core.config import Config
from llamagate.serve import Service
from tests.security.keyless import gateway_before, keyless_llama_server, work_done
from tests.support.gateway import Gateway, assert_openai_error
from tests.support.rawhttp import Client, request
from tests.support.service import free_port

# cpp-httplib's read window: what the backend reads with the head of a request it refuses
WINDOW = 4096
HIDDEN_BODY = json.dumps({"prompt": "hidden", "n_predict": 7}).encode()
HIDDEN = (b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n" % len(HIDDEN_BODY)) + HIDDEN_BODY
EXTENSION = ("PURGE", "SEARCH", "PROPFIND", "QUERY", "MKCOL", "LOCK", "REPORT")


@pytest.fixture
async def setup(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[str, Gateway]]:
    async with keyless_llama_server(tmp_path, tiny_model) as url, gateway_before(url) as gw:
        yield url, gw


def _smuggling(method: str, path: str, backend_url: str, rid: str) -> list[bytes]:
    """Requests whose body puts HIDDEN where llama-server would parse it as a new request:
    at the end of its read window of what the gateway sends (that head computed as the
    gateway's backend client writes it, and a few bytes either side of it)."""
    forwarded_head = (f"{method} {path} HTTP/1.1\r\nHost: {backend_url.removeprefix('http://')}"
                      f"\r\nAccept-Encoding: identity\r\nX-Request-ID: {rid}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 0000\r\n\r\n")
    out = []
    for slack in range(-8, 9, 4):
        pad = WINDOW - len(forwarded_head) + slack
        body = b"x" * pad + HIDDEN
        out.append(request(method, path, body, {"Content-Type": "application/json",
                                                "X-Request-ID": rid}))
    return out


async def _legit_completion(gateway: Gateway) -> int:
    """One completion through the gateway; its completion tokens."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.url}/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 1}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    return int(body["usage"]["completion_tokens"])


@pytest.mark.llama_server
@pytest.mark.parametrize("method", EXTENSION)
async def test_an_extension_method_with_a_hidden_request_is_refused_and_nothing_runs(
        setup: tuple[str, Gateway], method: str) -> None:
    url, gateway = setup
    before = await work_done(url)
    for path in ("/v1/models", "/v1/props", "/v1/slots"):
        for raw in _smuggling(method, path, url, "smuggle-1"):
            client = await Client.sending(gateway.url, raw)
            try:
                answer = await client.answer()
                assert answer.status == 405, (method, path, answer.status, answer.body[:300])
                assert answer.headers["allow"] == "GET, HEAD, POST"
                assert_openai_error(json.loads(answer.body), "invalid_request_error",
                                    "method_not_allowed")
                # the gateway read the body as a body: the connection stays in step
                await client.send(request("GET", "/ping"))
                assert (await client.answer()).status == 200
            finally:
                await client.close()
    # a request after them: had a hidden one run, llama-server counted its 7 tokens first
    predicted = await _legit_completion(gateway)
    after = await work_done(url)
    assert after[0] - before[0] == predicted, (before, after)


@pytest.mark.llama_server
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "TRACE", "OPTIONS"])
async def test_methods_llama_server_does_not_route_get_405_with_allow(
        setup: tuple[str, Gateway], method: str) -> None:
    url, gateway = setup
    before = await work_done(url)
    body = b"" if method in ("TRACE", "OPTIONS") else b"x" * 5000 + HIDDEN
    client = await Client.sending(gateway.url, request(method, "/v1/slots?action=erase", body))
    try:
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 405, (answer.status, answer.body[:300])
    assert answer.headers["allow"] == "GET, HEAD, POST"
    assert await work_done(url) == before


@pytest.mark.parametrize(("key", "warned"), [(None, True), ("backend-secret", False)])
async def test_serve_warns_once_of_an_external_backend_without_a_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str | None, warned: bool) -> None:
    config = Config(data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                    backend_url=f"http://127.0.0.1:{free_port()}", backend_api_key=key)
    service = Service(config)
    try:
        with caplog.at_level(logging.WARNING, logger="llamagate.serve"):
            await service._prepare_backend()
    finally:
        shutil.rmtree(service.runtime_dir, ignore_errors=True)
    said = [r for r in caplog.records if "BACKEND_API_KEY" in r.getMessage()
            and r.levelno == logging.WARNING]
    assert len(said) == (1 if warned else 0), [r.getMessage() for r in caplog.records]
    assert all("backend-secret" not in r.getMessage() for r in caplog.records)
