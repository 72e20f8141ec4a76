"""Issue 21, bug 2 and the gzip risk: every request's head is authenticated before a byte of
its body is read, not only `Expect: 100-continue` ones. A refused head with a body is
answered at once (401/403/429) and the connection closed after a short drain, its body never
buffered nor decoded; a refused head without a body is answered and the connection kept. A
head that passed keeps its key and ticket: checked, and charged, once."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.rawhttp import Client, request

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4}).encode()


@pytest.fixture
def secrets(keytool: KeyTool) -> dict[str, str]:
    options = {"plain": (), "scraper": ("--scopes", "metrics"), "two": ("--rpm", "2")}
    return {name: keytool.generate(name, *extra)[1] for name, extra in options.items()}


@pytest.fixture
async def gw(tmp_path: Path, fake: FakeLlama, secrets: dict[str, str]) -> AsyncIterator[Gateway]:
    async with serve_gateway(fake.url, auth_config(tmp_path)) as served:
        yield served


def head(secret: str | None, length: int, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {secret}\r\n" if secret is not None else ""
    return (f"POST {CHAT} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{auth}{extra}\r\n").encode()


@pytest.mark.parametrize("case", ["no-key", "wrong-key", "missing-scope"])
async def test_a_refused_head_is_answered_before_its_body(
        gw: Gateway, fake: FakeLlama, secrets: dict[str, str], case: str) -> None:
    secret = {"no-key": None, "wrong-key": "sk-not-a-key", "missing-scope": secrets["scraper"]}[case]
    client = await Client.sending(gw.port, head(secret, 9 * 1024 * 1024))  # no byte of the body
    try:
        answer = await client.answer()
        status = 403 if case == "missing-scope" else 401
        assert answer.status == status, answer
        assert_openai_error(json.loads(answer.body), "permission_error" if status == 403 else
                            "authentication_error",
                            {"no-key": "missing_api_key", "wrong-key": "invalid_api_key",
                             "missing-scope": "missing_scope"}[case])
        assert answer.headers["connection"] == "close" and answer.headers.get("x-request-id")
        assert await client.closed()  # after a short drain, the body never read
    finally:
        await client.close()
    assert fake.requests(CHAT) == []


async def test_a_gzip_body_without_a_key_is_never_decoded(gw: Gateway, fake: FakeLlama) -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MiB once decoded
    client = await Client.sending(gw.port, head(None, len(bomb), "Content-Encoding: gzip\r\n"))
    try:
        answer = await client.answer()  # before the body is sent
        assert answer.status == 401, answer
        assert await client.closed()
    finally:
        await client.close()


async def test_a_refused_head_without_a_body_keeps_the_connection(gw: Gateway) -> None:
    client = await Client.sending(gw.port, request("GET", "/v1/models"))
    try:
        assert (await client.answer()).status == 401
        await client.send(request("GET", "/ping"))
        assert (await client.answer()).status == 200
    finally:
        await client.close()


async def test_a_head_that_passed_is_charged_once(gw: Gateway, secrets: dict[str, str]) -> None:
    # a key with 2 requests a minute: two whole requests, bodies sent after their heads,
    # pass; the third is refused at its head
    client = await Client.connect(gw.port)
    try:
        for left in ("1", "0"):
            await client.send(head(secrets["two"], len(BODY)))
            await client.send(BODY)
            answer = await client.answer()
            assert answer.status == 200, answer
            assert answer.headers["x-ratelimit-remaining-requests"] == left
        await client.send(head(secrets["two"], len(BODY)))
        answer = await client.answer()
        assert answer.status == 429, answer
    finally:
        await client.close()
