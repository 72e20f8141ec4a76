"""Admin routes, the audit trail, and keys reloaded while requests run (poll, SIGHUP, admin)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp

from keys.audit import CLI_ACTOR, AuditEntry, AuditLog
from keys.db import open_db
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import Gateway, auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.wait import wait_until

CHAT: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def gateway_audit(db: Path) -> list[AuditEntry]:
    with contextlib.closing(open_db(db)) as conn:
        return [e for e in AuditLog(conn).list_audit() if e.actor != CLI_ACTOR]


def authenticates(gw: Gateway, secret: str) -> bool:
    """Whether the live keyring takes ``secret`` now (no request, so no failure is counted)."""
    assert gw.state.keys is not None
    return gw.state.keys.keyring.authenticate(secret, gw.state.clock()).ok


async def test_list_keys_shows_no_secret(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                                         http: aiohttp.ClientSession) -> None:
    admin_id, admin = keytool.generate("ops", "--scopes", "admin")
    app_id, _ = keytool.generate("app", "--rpm", "7", "--models", "tiny")
    keytool.rotate(app_id, "1h")
    config = auth_config(tmp_path)
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw, \
            http.get(gw.url + "/admin/keys", headers=bearer(admin)) as r:
        assert r.status == 200
        text = await r.text()
    listed = {k["id"]: k for k in json.loads(text)["data"]}
    assert listed[app_id]["limits"]["requests_per_minute"] == 7
    assert listed[app_id]["models"] == ["tiny"]
    assert len(listed[app_id]["previous_secrets_valid_until"]) == 1
    assert "sha256:" not in text and "hash" not in text
    assert not any(secret in text for secret in keytool.secrets)
    assert [(e.actor, e.action) for e in gateway_audit(config.usage_db)] == [(admin_id, "list_keys")]


async def test_reload_endpoint_and_a_corrupt_file(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    admin_id, admin = keytool.generate("ops", "--scopes", "admin")
    config = auth_config(tmp_path)
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        _, late = keytool.generate("late")
        assert not authenticates(gw, late)
        async with http.post(gw.url + "/admin/keys/reload", headers=bearer(admin)) as r:
            assert (r.status, await r.json()) == (
                200, {"ok": True, "keys": 2, "error": None, "file_missing": False})
        assert authenticates(gw, late)

        keys_text = config.auth_keys_file.read_text()
        config.auth_keys_file.write_text(keys_text[: len(keys_text) // 2])
        async with http.post(gw.url + "/admin/keys/reload", headers=bearer(admin)) as r:
            body = await r.json()
            assert (r.status, body["ok"], body["keys"]) == (500, False, 2)
        # the last good set keeps working
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(late)) as r:
            assert r.status == 200
    actions = [(e.actor, e.action, e.detail["ok"]) for e in gateway_audit(config.usage_db)]
    assert actions == [(admin_id, "reload", True), (admin_id, "reload", False)]


async def test_usage_filters(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                             http: aiohttp.ClientSession) -> None:
    admin_id, admin = keytool.generate("ops", "--scopes", "admin")
    a_id, a = keytool.generate("a")
    _, b = keytool.generate("b")
    config = auth_config(tmp_path)
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        for secret in (a, b, b):
            async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                                 headers=bearer(secret)) as r:
                assert r.status == 200

        async def usage(**params: str) -> tuple[int, Any]:
            async with http.get(gw.url + "/admin/usage", params=params, headers=bearer(admin)) as r:
                return r.status, await r.json()

        status, body = await usage()
        assert status == 200 and sum(row["requests"] for row in body["data"]) == 3
        status, body = await usage(key=a_id, since="1h")
        assert [(row["key_id"], row["requests"]) for row in body["data"]] == [(a_id, 1)]
        status, body = await usage(until="2001-01-01")
        assert body["data"] == []
        status, body = await usage(since="yesterday-ish")
        assert status == 400 and body["error"]["param"] == "since"
    audited = [(e.actor, e.action, e.target) for e in gateway_audit(config.usage_db)]
    assert (admin_id, "read_usage", a_id) in audited


async def test_polling_picks_up_a_disabled_key_while_a_stream_runs(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    key_id, secret = keytool.generate("app")
    metered_fake.switches.hang_after = 1  # streams wait for `release`
    async with serve_gateway(metered_fake.url, auth_config(tmp_path, keys_reload_interval=0.05),
                             models=METERED.models) as gw:
        url = gw.url + "/v1/chat/completions"
        async with http.post(url, json={**CHAT, "stream": True}, headers=bearer(secret)) as stream:
            await stream.content.readuntil(b"\n\n")
            keytool.ok("disable", key_id)
            await wait_until(lambda: not authenticates(gw, secret), "the poller to reload")
            async with http.post(url, json=CHAT, headers=bearer(secret)) as r:
                assert r.status == 401
            metered_fake.release.set()
            assert b"[DONE]" in await stream.read()  # admitted before: it finishes
        keytool.ok("enable", key_id)
        await wait_until(lambda: authenticates(gw, secret), "the poller to reload again")
        async with http.post(url, json=CHAT, headers=bearer(secret)) as r:
            assert r.status == 200


async def test_sighup_reloads(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                              http: aiohttp.ClientSession) -> None:
    key_id, old = keytool.generate("app")
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        new = keytool.rotate(key_id, "0")
        assert authenticates(gw, old) and not authenticates(gw, new)
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: authenticates(gw, new), "SIGHUP to reload the keys")
        assert not authenticates(gw, old)
        async with http.get(gw.url + "/v1/models", headers=bearer(old)) as r:
            assert r.status == 401
