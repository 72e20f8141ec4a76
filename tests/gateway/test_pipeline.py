"""Every request on the gateway port passes the one pipeline (gateway/pipeline.py), in the order
its STAGES say, for a token-path route and an admin route alike.

Each test sends a request that two stages would refuse and checks that the earlier one
answered: that is the order, seen from outside."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway import pipeline
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.rawhttp import Client, request

TOKEN = "/v1/chat/completions"
ADMIN = "/admin/keys"
CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 2}).encode()


def test_the_stages_in_order() -> None:
    assert pipeline.STAGES == ("observe", "errors", "refusal", "preflight", "route", "auth",
                               "ratelimit", "handler")


@pytest.fixture
def keytool(tmp_path: Path) -> KeyTool:
    return KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")


@pytest.fixture
async def gateway(fake: FakeLlama, tmp_path: Path, keytool: KeyTool) -> AsyncIterator[Gateway]:
    keytool.generate("boot")  # the store exists before the gateway reads it
    config = auth_config(tmp_path, max_body_bytes=4096, cors_origins=("https://app.example",))
    async with serve_gateway(fake.url, config) as gw:
        yield gw


def _key(gateway: Gateway, keytool: KeyTool, *options: str) -> str:
    _, secret = keytool.generate("k", *options)
    assert gateway.state.keys is not None
    gateway.state.keys.reload()
    return secret


async def _ask(gateway: Gateway, method: str, path: str, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    client = await Client.connect(gateway.port)
    try:
        await client.send(request(method, path, body, headers or {}))
        answer = await client.answer()
        return answer.status, answer.headers, answer.body
    finally:
        await client.close()


def _code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


@pytest.mark.parametrize("path", [TOKEN, ADMIN])
async def test_refusal_comes_before_auth(gateway: Gateway, path: str) -> None:
    status, headers, body = await _ask(gateway, "POST", path, b"x" * 8192)
    assert status == 413
    assert "x-request-id" in headers  # observe ran around it


@pytest.mark.parametrize("path", [TOKEN, ADMIN])
async def test_preflight_comes_before_auth(gateway: Gateway, path: str) -> None:
    status, headers, _ = await _ask(gateway, "OPTIONS", path, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize("path", ["/v1/./chat/completions", "/admin/./keys"])
async def test_a_non_canonical_path_is_refused_before_auth(gateway: Gateway, path: str) -> None:
    status, _, body = await _ask(gateway, "GET", path)
    assert (status, _code(body)) == (404, "not_found")


@pytest.mark.parametrize("path", ["/admin/nothing-here", "/nothing-here"])
async def test_auth_comes_before_the_404_of_no_route(gateway: Gateway, keytool: KeyTool,
                                                     path: str) -> None:
    assert (await _ask(gateway, "GET", path))[0] == 401
    secret = _key(gateway, keytool)
    status, _, body = await _ask(gateway, "GET", path, headers={"Authorization": f"Bearer {secret}"})
    assert (status, _code(body)) == (404, "not_found")


async def test_auth_comes_before_the_405_of_a_wrong_method(gateway: Gateway,
                                                           keytool: KeyTool) -> None:
    assert (await _ask(gateway, "DELETE", ADMIN))[0] == 401
    secret = _key(gateway, keytool, "--scopes", "admin")
    status, headers, body = await _ask(gateway, "DELETE", ADMIN,
                                       headers={"Authorization": f"Bearer {secret}"})
    assert (status, _code(body)) == (405, "method_not_allowed")
    assert headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(("path", "scopes"), [(TOKEN, "admin"), (ADMIN, "inference")])
async def test_the_scope_is_the_routes(gateway: Gateway, keytool: KeyTool, path: str,
                                       scopes: str) -> None:
    secret = _key(gateway, keytool, "--scopes", scopes)
    status, _, body = await _ask(gateway, "POST" if path == TOKEN else "GET", path, CHAT,
                                 {"Authorization": f"Bearer {secret}"})
    assert (status, _code(body)) == (403, "missing_scope")


@pytest.mark.parametrize("path", [TOKEN, ADMIN])
async def test_the_rate_limit_comes_after_auth_and_before_the_handler(
        gateway: Gateway, keytool: KeyTool, fake: FakeLlama, path: str) -> None:
    secret = _key(gateway, keytool, "--rpm", "1", "--scopes", "inference,admin")
    method = "POST" if path == TOKEN else "GET"
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    status, headers, _ = await _ask(gateway, method, path, CHAT, auth)
    assert status == 200
    assert headers["x-ratelimit-remaining-requests"] == "0"  # the stage ran for this route
    backend_calls = len(fake.requests())
    status, _, body = await _ask(gateway, method, path, CHAT, auth)
    assert (status, _code(body)) == (429, "rate_limit_exceeded")
    assert len(fake.requests()) == backend_calls  # the handler never ran
    # a wrong key is refused by auth, before it could spend anyone's budget
    status, _, _ = await _ask(gateway, method, path, CHAT, {"Authorization": "Bearer lg-wrong"})
    assert status == 401
