"""Every failure on the gateway port is OpenAI-shaped error JSON (the pipeline's errors stage)."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from gateway.edge.call import Call
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, serve_gateway


async def test_unknown_route_is_404_openai_shaped(gateway: Gateway, fake: FakeLlama,
                                                  http: aiohttp.ClientSession) -> None:
    for path in ("/nope", "/v2/chat/completions", "/"):
        async with http.post(gateway.url + path, json={"x": 1}) as r:
            assert r.status == 404, path
            assert r.content_type == "application/json"
            assert r.headers["X-Request-ID"]
            assert_openai_error(await r.json(), "invalid_request_error", "not_found")
    assert fake.requests() == []


async def test_wrong_method_is_405_openai_shaped(gateway: Gateway,
                                                 http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + "/metrics", data=b"") as r:
        assert r.status == 405
        assert r.content_type == "application/json"
        assert "GET" in r.headers["Allow"]
        assert_openai_error(await r.json(), "invalid_request_error", "method_not_allowed")


async def test_unexpected_exception_is_500_without_a_trace(
        fake: FakeLlama, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    async def boom(call: Call) -> None:
        raise RuntimeError("internal detail /srv/secret/path")

    async with serve_gateway(fake.url, {}, extra_routes=[(["GET"], "/boom", boom)]) as gateway:
        with caplog.at_level(logging.ERROR, logger="llamagate"):
            async with http.get(gateway.url + "/boom") as r:
                assert r.status == 500
                assert r.content_type == "application/json"
                text = await r.text()
        assert "secret" not in text and "Traceback" not in text
        assert_openai_error(await r.json(), "server_error", "internal_error")
        # the detail goes to the log, for operators
        assert any(rec.exc_info and "internal detail" in str(rec.exc_info[1])
                   for rec in caplog.records if rec.name.startswith("llamagate"))
