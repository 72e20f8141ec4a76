"""Per-key limits through the served gateway: 429s, headers (streams too), settlement, usage."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.fake_llama import METERED, PROMPT_TOKENS, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool

CHAT: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 10}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_requests_per_minute(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                                   http: aiohttp.ClientSession) -> None:
    _, limited = keytool.generate("limited", "--rpm", "2")
    _, other = keytool.generate("other", "--rpm", "2")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        remaining = []
        for _ in range(2):
            async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                                 headers=bearer(limited)) as r:
                assert r.status == 200
                assert r.headers["x-ratelimit-limit-requests"] == "2"
                remaining.append(r.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["1", "0"]
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers=bearer(limited)) as r:
            assert r.status == 429
            error = (await r.json())["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert 1 <= int(r.headers["Retry-After"]) <= 30
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers=bearer(other)) as r:
            assert r.status == 200  # limits are per key
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=limited,
                                      max_retries=0) as client:
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="tiny", messages=CHAT["messages"])
    assert len(metered_fake.routes(listing=False)) == 3


async def test_service_defaults_apply_to_keys_without_limits(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, plain = keytool.generate("plain")
    _, own = keytool.generate("own", "--rpm", "5")
    _, unlimited_scope = keytool.generate("metrics", "--scopes", "metrics")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path, max_requests_per_minute=1),
                             models=METERED.models) as gw:
        statuses = []
        for _ in range(2):
            async with http.get(gw.url + "/v1/models", headers=bearer(plain)) as r:
                statuses.append(r.status)
        async with http.get(gw.url + "/v1/models", headers=bearer(own)) as r:
            assert r.headers["x-ratelimit-limit-requests"] == "5"
        async with http.get(gw.url + "/metrics", headers=bearer(unlimited_scope)) as r:
            assert r.headers["x-ratelimit-limit-requests"] == "1"
    assert statuses == [200, 429]


async def test_no_limits_no_headers(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                                    http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("free")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw, \
            http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(secret)) as r:
        assert r.status == 200
        assert not [h for h in r.headers if h.lower().startswith("x-ratelimit")]


async def test_tokens_are_reserved_and_settled_from_usage(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("tokens", "--tpm", "100")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        async def chat(max_tokens: int) -> aiohttp.ClientResponse:
            async with http.post(gw.url + "/v1/chat/completions", headers=bearer(secret),
                                 json={**CHAT, "max_tokens": max_tokens}) as r:
                await r.read()
                return r

        first = await chat(40)  # reserves 40, settles at 5 + 40 used
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert 54 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 56
        refused = await chat(60)
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "tokens_rate_limit_exceeded"
        assert "Retry-After" in refused.headers
        assert (await chat(40)).status == 200
    assert len(metered_fake.routes(listing=False)) == 2


@pytest.mark.parametrize("max_tokens", [10, 80])  # under and over STREAM_TO_BACKEND_MIN_TOKENS
async def test_a_request_the_backend_refuses_is_not_charged_its_reservation(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession,
        max_tokens: int) -> None:
    _, secret = keytool.generate("tokens", "--tpm", "100")
    metered_fake.switches.status = 400  # llama-server's 400: it generated nothing
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        async with http.post(gw.url + "/v1/chat/completions", headers=bearer(secret),
                             json={**CHAT, "max_tokens": max_tokens}) as r:
            assert r.status == 400
        metered_fake.switches.status = 200
        async with http.post(gw.url + "/v1/chat/completions", headers=bearer(secret),
                             json={**CHAT, "max_tokens": 10}) as r:
            assert r.status == 200
            # only this one's 5 + 10 are charged: the refused one's reservation came back
            assert 85 <= int(r.headers["x-ratelimit-remaining-tokens"]) <= 87


async def test_streams_get_headers_and_hold_a_concurrency_slot(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("streamer", "--max-concurrent", "1", "--tpm", "1000", "--rpm", "10")
    metered_fake.switches.hang_after = 1  # streams wait for `release`
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        url = gw.url + "/v1/chat/completions"
        async with http.post(url, json={**CHAT, "stream": True}, headers=bearer(secret)) as stream:
            assert stream.status == 200
            assert stream.headers["x-ratelimit-remaining-requests"] == "9"
            assert stream.headers["x-ratelimit-remaining-tokens"] == "990"  # 10 reserved
            await stream.content.readuntil(b"\n\n")  # the first chunk: the stream is open
            async with http.post(url, json=CHAT, headers=bearer(secret)) as r:
                assert r.status == 429
                assert (await r.json())["error"]["message"].endswith("1 concurrent requests")
            metered_fake.release.set()
            assert b"[DONE]" in await stream.read()
        async with http.post(url, json=CHAT, headers=bearer(secret)) as r:
            assert r.status == 200
            # the stream settled from its final event's timings: 5 + 10 tokens
            assert 970 <= int(r.headers["x-ratelimit-remaining-tokens"]) <= 975


async def test_usage_is_recorded_per_key_and_model(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    app_id, app = keytool.generate("app")
    _, admin = keytool.generate("ops", "--scopes", "admin")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        for body in ({**CHAT, "max_tokens": 3}, {**CHAT, "max_tokens": 4, "stream": True},
                     {**CHAT, "model": "other", "max_tokens": 5}):
            async with http.post(gw.url + "/v1/chat/completions", json=body,
                                 headers=bearer(app)) as r:
                assert r.status == 200
                await r.read()
        async with http.get(gw.url + "/admin/usage", params={"key": app_id},
                            headers=bearer(admin)) as r:
            rows = (await r.json())["data"]
    by_model = {row["model"]: row for row in rows}
    assert by_model["tiny"]["requests"] == 2
    assert by_model["tiny"]["completion_tokens"] == 7
    assert by_model["tiny"]["prompt_tokens"] == 2 * PROMPT_TOKENS
    assert by_model["other"]["completion_tokens"] == 5
    assert {row["key_id"] for row in rows} == {app_id}


async def test_every_authenticated_request_is_a_use_of_its_key(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    """An operator prunes keys by their last use: a metrics scraper's or an admin's key
    is used though it spends no tokens."""
    scraper_id, scraper = keytool.generate("scraper", "--scopes", "metrics")
    admin_id, admin = keytool.generate("ops", "--scopes", "admin")
    idle_id, _ = keytool.generate("idle")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        for path, secret in (("/metrics", scraper), ("/admin/keys", admin)):
            async with http.get(gw.url + path, headers=bearer(secret)) as r:
                assert r.status == 200
    # the gateway is closed: what it buffered is written
    listed = {k["id"]: k["last_used"] for k in json.loads(keytool.ok("list", "--json"))}
    assert listed[scraper_id] is not None and listed[admin_id] is not None
    assert listed[idle_id] is None


async def test_a_client_that_leaves_frees_its_slot(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("leaver", "--max-concurrent", "1")
    metered_fake.switches.hang_after = 1  # streams wait for `release`
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        url = gw.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as leaving:
            stream = await leaving.post(url, json={**CHAT, "stream": True}, headers=bearer(secret))
            await stream.content.readuntil(b"\n\n")
            stream.close()  # drop the connection mid-stream
        # idle is set as the cancelled handler unwinds, in the step that frees the key's slot
        await asyncio.wait_for(gw.state.idle.wait(), 10)
        metered_fake.release.set()
        async with http.post(url, json=CHAT, headers=bearer(secret)) as r:
            assert r.status == 200
