"""A key that is not UTF-8 (issue 21, bug 3): `x-api-key: lg-\\x94` or `Authorization:
Bearer lg-\\x94` is an invalid key on every route (401), counted by the auth-failure
throttle like any other wrong key (429 past AUTH_FAILURES_PER_MINUTE), and never a
traceback in the log. Sent over raw sockets: HTTP clients refuse to send such bytes."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.rawhttp import Client

PATHS = ("/admin/keys", "/metrics", "/nowhere", "/v1/models", "/v1/chat/completions")
HEADERS = (b"x-api-key: lg-\x94", b"Authorization: Bearer lg-\x94",
           b"x-api-key: \xff\xfe", b"Authorization: Bearer lg-\xc3\x28abc")


def _head(method: str, path: str, header: bytes) -> bytes:
    body = b'{"model": "tiny", "messages": []}' if method == "POST" else b""
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + header + b"\r\n\r\n" + body


async def _status(url: str, path: str, header: bytes) -> tuple[int, dict[str, object]]:
    method = "POST" if path == "/v1/chat/completions" else "GET"
    client = await Client.sending(url, _head(method, path, header))
    try:
        answer = await client.answer()
    finally:
        await client.close()
    return answer.status, json.loads(answer.body)


@pytest.mark.parametrize("header", HEADERS, ids=["x-api-key", "bearer", "x-api-key-ff", "bearer-c3"])
async def test_a_non_utf8_key_is_an_invalid_key_on_every_route(
        tmp_path: Path, fake: FakeLlama, keytool: KeyTool, caplog: pytest.LogCaptureFixture,
        header: bytes) -> None:
    keytool.generate("app")
    config = replace(auth_config(tmp_path), auth_failures_per_minute=1_000)
    async with serve_gateway(fake.url, config) as gw:
        for path in PATHS:
            status, body = await _status(gw.url, path, header)
            assert status == 401, (path, status, body)
            error = body["error"]
            assert isinstance(error, dict) and error["code"] == "invalid_api_key", (path, body)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_non_utf8_keys_are_counted_by_the_failure_throttle(
        tmp_path: Path, fake: FakeLlama, keytool: KeyTool, caplog: pytest.LogCaptureFixture) -> None:
    keytool.generate("app")
    limit = 5
    config = replace(auth_config(tmp_path), auth_failures_per_minute=limit)
    async with serve_gateway(fake.url, config) as gw:
        statuses = [(await _status(gw.url, PATHS[i % len(PATHS)], HEADERS[i % 2]))[0]
                    for i in range(limit + 3)]
    assert set(statuses[:limit]) == {401}, statuses
    assert statuses[-1] == 429, statuses
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
