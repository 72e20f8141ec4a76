"""Authentication and authorization: the gateway served on 127.0.0.1 before a fake backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.policy.auth import is_canonical, presented_secret
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body: dict[str, Any] = (await resp.json())["error"]
    return body


@pytest.mark.parametrize(("path", "ok"), [
    ("/", True), ("/v1/chat/completions", True), ("/v1/models/org:model-Q4_K.gguf", True),
    ("//v1/chat", False), ("/v1//chat", False), ("/v1/chat/", False), ("/v1/./chat", False),
    ("/v1/../admin", False), ("/v1/..", False), ("/v1/chat?x", False), ("/v1/chat#x", False),
    ("/%61dmin", False), ("/v1/chat\x00", False), ("/v1\\..\\admin", False), ("v1", False),
])
def test_canonical_paths(path: str, ok: bool) -> None:
    assert is_canonical(path) is ok


@pytest.mark.parametrize(("headers", "secret"), [
    ({"Authorization": "Bearer s1"}, "s1"), ({"Authorization": "bearer  s1 "}, "s1"),
    ({"x-api-key": "s2"}, "s2"), ({"Authorization": "Bearer s1", "x-api-key": "s2"}, "s1"),
    ({"Authorization": "Basic abc"}, None), ({"Authorization": "Bearer "}, None), ({}, None),
])
def test_presented_secret(headers: dict[str, str], secret: str | None) -> None:
    # aiohttp's case-insensitive headers, and the edge server's lower-cased ones
    assert presented_secret(make_mocked_request("GET", "/", headers=headers).headers) == secret
    assert presented_secret({k.lower(): v for k, v in headers.items()}) == secret


async def test_probes_are_public_everything_else_needs_a_key(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("app")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        for path in ("/ping", "/health"):
            async with http.get(gw.url + path) as r:
                assert r.status == 200
        async with http.get(gw.url + "/health") as r:
            assert (await r.json())["auth"] is True
        for path in ("/v1/models", "/metrics", "/admin/keys", "/nowhere"):
            async with http.get(gw.url + path) as r:
                assert r.status == 401
                assert (await error_of(r))["type"] == "authentication_error"
        async with http.get(gw.url + "/nowhere", headers=bearer(secret)) as r:
            assert r.status == 404
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers={"x-api-key": secret}) as r:
            assert r.status == 200
        async with http.options(gw.url + "/v1/chat/completions", headers={
                "Origin": "http://a.example", "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 204  # preflights never carry credentials
    assert metered_fake.routes(listing=False) == ["POST /v1/chat/completions"]


async def test_each_refusal_says_why(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                                     http: aiohttp.ClientSession) -> None:
    now = [1_700_000_000.0]
    keytool.clock = lambda: now[0]
    _, expiring = keytool.generate("expiring", "--expires", "1h")
    disabled_id, disabled = keytool.generate("disabled")
    keytool.ok("disable", disabled_id)
    async with serve_gateway(metered_fake.url, auth_config(tmp_path),
                             models=METERED.models, clock=lambda: now[0]) as gw:
        cases = [({}, "missing_api_key"), (bearer("lg-not-a-key"), "invalid_api_key"),
                 (bearer(disabled), "disabled_api_key")]
        for headers, code in cases:
            async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
                assert (r.status, (await error_of(r))["code"]) == (401, code)
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers=bearer(expiring)) as r:
            assert r.status == 200
        now[0] += 3600
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers=bearer(expiring)) as r:
            assert (r.status, (await error_of(r))["code"]) == (401, "expired_api_key")
    assert metered_fake.routes(listing=False) == ["POST /v1/chat/completions"]


async def test_rotation_grace_with_an_injected_clock(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    now = [1_700_000_000.0]
    keytool.clock = lambda: now[0]
    key_id, old = keytool.generate("rotating")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path),
                             models=METERED.models, clock=lambda: now[0]) as gw:
        new = keytool.rotate(key_id, "1h")
        assert gw.state.keys is not None and gw.state.keys.reload().ok

        async def status(secret: str) -> int:
            async with http.get(gw.url + "/v1/models", headers=bearer(secret)) as r:
                return r.status

        now[0] += 3599
        assert (await status(old), await status(new)) == (200, 200)
        now[0] += 1
        assert (await status(old), await status(new)) == (401, 200)


async def test_scopes(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                      http: aiohttp.ClientSession) -> None:
    _, inference = keytool.generate("app")
    _, metrics = keytool.generate("scraper", "--scopes", "metrics")
    _, admin = keytool.generate("ops", "--scopes", "admin")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        expected = [(inference, "/admin/keys", 403), (inference, "/metrics", 403),
                    (metrics, "/metrics", 200), (metrics, "/v1/models", 403),
                    (admin, "/admin/keys", 200), (admin, "/metrics", 403), (admin, "/v1/models", 403)]
        for secret, path, status in expected:
            async with http.get(gw.url + path, headers=bearer(secret)) as r:
                assert (secret, path, r.status) == (secret, path, status)
                if status == 403:
                    assert (await error_of(r))["type"] == "permission_error"
    assert metered_fake.routes(listing=False) == []


async def test_public_metrics(tmp_path: Path, metered_fake: FakeLlama,
                              http: aiohttp.ClientSession) -> None:
    async with serve_gateway(metered_fake.url, auth_config(tmp_path, metrics_public=True),
                             models=METERED.models) as gw, \
            http.get(gw.url + "/metrics") as r:
        assert r.status == 200


async def test_model_allowlist(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                               http: aiohttp.ClientSession) -> None:
    _, tiny_only = keytool.generate("tiny-only", "--models", "tiny")
    _, other_only = keytool.generate("other-only", "--models", "other")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        async with http.post(gw.url + "/v1/chat/completions", headers=bearer(tiny_only),
                             json={**CHAT, "model": "other"}) as r:
            assert r.status == 403
            assert (await error_of(r))["code"] == "model_not_allowed"
        async with http.post(gw.url + "/v1/chat/completions", headers=bearer(tiny_only),
                             json=CHAT) as r:
            assert r.status == 200
        async with http.get(gw.url + "/v1/models", headers=bearer(tiny_only)) as r:
            listing = await r.json()
        assert [m["id"] for m in listing["data"]] == ["tiny"]
        assert [m["name"] for m in listing["models"]] == ["tiny"]
        for model, status in (("tiny", 200), ("other", 404)):  # retrieve shows no more either
            async with http.get(gw.url + f"/v1/models/{model}", headers=bearer(tiny_only)) as r:
                assert r.status == status, model
        # A body that names no model runs on the default model (tiny).
        async with http.post(gw.url + "/v1/tokenize", headers=bearer(other_only), json={}) as r:
            assert r.status == 403
        # llama-server's other APIs run the model their body names, checked the same way
        anthropic = {"model": "other", "max_tokens": 4, "messages": CHAT["messages"]}
        for path, body in (("/v1/messages", anthropic),
                           ("/v1/responses", {"model": "other", "input": "hi"}),
                           ("/v1/rerank", {"model": "other", "query": "q", "documents": ["d"]}),
                           ("/v1/messages/count_tokens", anthropic)):
            async with http.post(gw.url + path, headers=bearer(tiny_only), json=body) as r:
                assert r.status == 403, path
                assert (await error_of(r))["code"] == "model_not_allowed"
        # a byte-order mark is still JSON to llama-server, so it hides nothing here
        raw = b"\xef\xbb\xbf" + json.dumps(anthropic).encode()
        headers = {**bearer(tiny_only), "Content-Type": "application/json"}
        async with http.post(gw.url + "/v1/messages/count_tokens", headers=headers,
                             data=raw) as r:
            assert r.status == 403
            assert (await error_of(r))["code"] == "model_not_allowed"
        # a form's text fields are JSON to llama-server: its `model` is checked too
        form = aiohttp.FormData()
        form.add_field("model", "other")
        form.add_field("file", b"RIFF", filename="a.wav", content_type="audio/wav")
        for path in ("/v1/messages/count_tokens", "/v1/audio/transcriptions"):
            async with http.post(gw.url + path, headers=bearer(tiny_only), data=form) as r:
                assert r.status == 403, path
                assert (await error_of(r))["code"] == "model_not_allowed"
        twice = aiohttp.FormData()
        twice.add_field("model", "tiny")
        twice.add_field("model", "other")  # llama-server would make it an array
        twice.add_field("file", b"RIFF", filename="a.wav", content_type="audio/wav")
        async with http.post(gw.url + "/v1/audio/transcriptions", headers=bearer(tiny_only),
                             data=twice) as r:
            assert r.status == 400
        # what looks like JSON but does not parse cannot be checked: refused
        async with http.post(gw.url + "/v1/messages/count_tokens", headers=headers,
                             data=b'{"model": "other", }') as r:
            assert r.status == 400
            assert (await error_of(r))["code"] == "invalid_json"
        async with http.post(gw.url + "/v1/chat/completions", headers=bearer(other_only),
                             json={**CHAT, "model": None}) as r:
            assert r.status == 403
    assert metered_fake.routes(listing=False) == ["POST /v1/chat/completions"]


async def test_failing_addresses_are_throttled_alone(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool) -> None:
    _, secret = keytool.generate("app")

    def client_from(address: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))

    config = auth_config(tmp_path, auth_failures_per_minute=3)
    async with serve_gateway(metered_fake.url, config,
                             models=METERED.models) as gw, client_from("127.0.0.2") as bad, \
            client_from("127.0.0.3") as good:
        url = gw.url + "/v1/models"
        statuses = []
        for _ in range(4):
            async with bad.get(url, headers=bearer("lg-guess")) as r:
                statuses.append(r.status)
                retry_after = r.headers.get("Retry-After")
        assert statuses == [401, 401, 401, 429]
        assert retry_after is not None and int(retry_after) >= 1
        async with bad.get(url, headers=bearer(secret)) as r:
            assert r.status == 429  # a throttled address gets no answer about any key
        async with bad.get(url) as r:
            assert r.status == 429
        async with good.get(url, headers=bearer("lg-typo")) as r:
            assert r.status == 401
        async with good.get(url, headers=bearer(secret)) as r:
            assert r.status == 200
        async with bad.get(gw.url + "/health") as r:
            assert r.status == 200  # probes stay open


async def test_missing_keys_do_not_count_as_guesses(
        tmp_path: Path, metered_fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    async with serve_gateway(metered_fake.url, auth_config(tmp_path, auth_failures_per_minute=1),
                             models=METERED.models) as gw:
        for _ in range(3):
            async with http.get(gw.url + "/v1/models") as r:
                assert r.status == 401


async def test_sdk_errors(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool) -> None:
    _, tiny_only = keytool.generate("tiny-only", "--models", "tiny")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        def client(secret: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)

        messages: Any = CHAT["messages"]
        async with client("lg-wrong") as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="tiny", messages=messages)
        async with client(tiny_only) as c:
            with pytest.raises(openai.PermissionDeniedError):
                await c.chat.completions.create(model="other", messages=messages)
            assert [m.id async for m in c.models.list()] == ["tiny"]


async def test_auth_off_lets_everything_through_and_has_no_admin(
        tmp_path: Path, metered_fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    async with serve_gateway(metered_fake.url, auth_config(tmp_path, auth_enabled=False),
                             models=METERED.models) as gw:
        assert gw.state.keys is None and gw.state.limiter is None
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert not any(h.startswith("x-ratelimit") for h in r.headers)
        async with http.get(gw.url + "/health") as r:
            assert (await r.json())["auth"] is False
        async with http.post(gw.url + "/admin/keys/reload") as r:
            assert r.status == 404
