"""No path variant reaches a protected handler or the backend without the right key."""

from __future__ import annotations

import contextlib
from pathlib import Path

import aiohttp
import pytest

from keys.audit import CLI_ACTOR, AuditLog
from keys.db import open_db
from tests.gateway.policy.bypass_paths import BYPASS_PATHS, CHAT_BODY
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool
from tests.support.rawhttp import exchange


def admin_actions(db: Path) -> int:
    """Audit entries written by the gateway's admin handlers (key_mgmt writes its own)."""
    with contextlib.closing(open_db(db)) as conn:
        return len([e for e in AuditLog(conn).list_audit() if e.actor != CLI_ACTOR])


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_no_variant_gets_past_without_a_key(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, method: str) -> None:
    keytool.generate("app")
    config = auth_config(tmp_path, auth_failures_per_minute=1)
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        for target in BYPASS_PATHS:
            status, body = await exchange(gw.url, method, target, body=CHAT_BODY)
            assert status in (401, 404), (target, status, body)
            # the gateway wrote the refusal itself
            assert body["error"]["type"] in ("authentication_error", "invalid_request_error"), target
    assert metered_fake.routes() == []
    assert admin_actions(config.usage_db) == 0  # no admin handler ran


async def test_an_inference_key_reaches_only_inference(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool) -> None:
    _, secret = keytool.generate("app")
    config = auth_config(tmp_path)
    headers = {"Authorization": f"Bearer {secret}"}
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        for target in BYPASS_PATHS:
            before = len(metered_fake.routes())
            status, body = await exchange(gw.url, "POST", target, headers, CHAT_BODY)
            forwarded = metered_fake.routes()[before:]
            if status == 200:
                # only spellings of the real route (absolute form, a real query) get through,
                # and then as the validated, accounted request
                assert forwarded == ["POST /v1/chat/completions"], target
            else:
                assert status in (403, 404, 405), (target, status, body)
            if "%2f" in target.lower().partition("?")[0]:  # an encoded delimiter: no route
                assert status == 404, (target, status, body)
                # The proxy passes unknown /v1 paths through as they are (the backend says 404);
                # nothing it forwards leaves /v1 or gets resolved on the way.
                assert all(f.startswith("POST /v1/") and "/." not in f for f in forwarded), target
        status, body = await exchange(gw.url, "POST", "/v1/../admin/keys/reload", headers)
        assert status == 404
    assert admin_actions(config.usage_db) == 0


async def test_an_admin_key_cannot_reach_the_backend_off_v1(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("ops", "--scopes", "admin,inference")
    headers = {"Authorization": f"Bearer {secret}"}
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        for target in ("/v1/../slots", "/v1/%2e%2e/props", "/v1/..%2fhealth", "/v1/chat/..%2F..%2Fslots"):
            status, _ = await exchange(gw.url, "POST", target, headers, "{}")
            assert status == 404, target
    assert metered_fake.routes() == []
