"""`Expect: 100-continue` is answered only once the head passed the gate (route, key, scope,
rate limit): a refused client gets its 401/403/429 before it sends a byte of its body, and
the connection is closed. A head that passed is not checked, nor charged, again when its
body is in; one whose body never comes gives back what it was admitted with."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.rawhttp import Client, request

BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4}).encode()
CHAT = "/v1/chat/completions"


def head(secret: str | None, length: int = len(BODY)) -> bytes:
    """A chat completion's head that waits for `100 Continue` before its body."""
    auth = f"Authorization: Bearer {secret}\r\n" if secret is not None else ""
    return (f"POST {CHAT} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n{auth}\r\n").encode()


async def first_head(client: Client) -> bytes:
    return await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)


@pytest.fixture
def secrets(keytool: KeyTool) -> dict[str, str]:
    """The keys the tests use, by name, made before the gateway reads the keys file."""
    options = {"plain": (), "scraper": ("--scopes", "metrics"), "limited": ("--rpm", "1"),
               "two": ("--rpm", "2"), "single": ("--max-concurrent", "1")}
    return {name: keytool.generate(name, *extra)[1] for name, extra in options.items()}


@pytest.fixture
async def gw(tmp_path: Path, fake: FakeLlama, secrets: dict[str, str]
             ) -> AsyncIterator[Gateway]:
    async with serve_gateway(fake.url, auth_config(tmp_path)) as served:
        yield served


async def connect(gw: Gateway) -> Client:
    return await Client.connect(gw.port)


@pytest.mark.parametrize("case", ["no-key", "wrong-key", "missing-scope", "rate-limited"])
async def test_a_refused_head_gets_its_error_before_the_body_and_the_connection_closes(
        gw: Gateway, fake: FakeLlama, secrets: dict[str, str], case: str) -> None:
    secret = {"no-key": None, "wrong-key": "sk-not-a-key", "missing-scope": secrets["scraper"],
              "rate-limited": secrets["limited"]}[case]
    client = await connect(gw)
    try:
        if case == "rate-limited":  # its one request of the minute
            await client.send(request("POST", CHAT, BODY, {"Authorization": f"Bearer {secret}",
                                                            "Content-Type": "application/json"}))
            assert (await client.answer()).status == 200
            await client.close()
            client = await connect(gw)
        seen = len(fake.requests())
        # a body the client would upload (within MAX_BODY_BYTES) were it told to go on
        await client.send(head(secret, length=1_000_000))
        answer = await first_head(client)
        status, want = {"no-key": (401, ("authentication_error", "missing_api_key")),
                        "wrong-key": (401, ("authentication_error", "invalid_api_key")),
                        "missing-scope": (403, ("permission_error", "missing_scope")),
                        "rate-limited": (429, ("rate_limit_error", "rate_limit_exceeded"))}[case]
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer  # not `100 Continue`
        lines = answer.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
        assert headers["connection"] == "close"
        assert "x-request-id" in headers  # answered by the gateway's handler, as every error
        if case == "rate-limited":
            assert int(headers["retry-after"]) >= 1
        body = await asyncio.wait_for(client.reader.readexactly(int(headers["content-length"])), 5)
        assert_openai_error(json.loads(body), *want)
        assert await client.closed()
        assert len(fake.requests()) == seen  # nothing went to the backend
    finally:
        await client.close()


async def test_a_head_that_passed_gets_100_and_is_charged_once(
        gw: Gateway, secrets: dict[str, str]) -> None:
    secret = secrets["two"]
    client = await connect(gw)
    try:
        await client.send(head(secret))
        assert await first_head(client) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(BODY)
        answer = await client.answer()
        assert answer.status == 200
        # one request of the two counted: the head's admission, not a second one at the body
        assert answer.headers["x-ratelimit-remaining-requests"] == "1"
        await client.send(request("POST", CHAT, BODY, {"Authorization": f"Bearer {secret}",
                                                        "Content-Type": "application/json"}))
        answer = await client.answer()
        assert (answer.status, answer.headers["x-ratelimit-remaining-requests"]) == (200, "0")
    finally:
        await client.close()


async def test_a_passed_head_holds_its_concurrency_slot_until_its_body_fails_to_come(
        gw: Gateway, secrets: dict[str, str]) -> None:
    secret = secrets["single"]
    plain = request("POST", CHAT, BODY, {"Authorization": f"Bearer {secret}",
                                         "Content-Type": "application/json"})
    waiting = await connect(gw)
    other = await connect(gw)
    try:
        await waiting.send(head(secret))
        assert await first_head(waiting) == b"HTTP/1.1 100 Continue\r\n\r\n"
        # admitted at its head: the key's one place is taken while its body is awaited
        await other.send(plain)
        refused = await other.answer()
        assert refused.status == 429
        await waiting.close()  # the body never comes: the place is given back
        for _ in range(500):  # each try is a request: until one is admitted, with a bound
            third = await connect(gw)
            try:
                await third.send(plain)
                answer = await third.answer()
            finally:
                await third.close()
            if answer.status == 200:
                break
            assert answer.status == 429
            await asyncio.sleep(0.01)  # the poll period of a deadline wait
        else:
            raise AssertionError("the place held by the abandoned request was never given back")
    finally:
        await waiting.close()
        await other.close()
