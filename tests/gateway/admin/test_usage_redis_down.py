"""/admin/usage in a fleet (REDIS_URL) whose Redis does not answer: RedisUsage.usage() raises
FleetDown, which the route answers as an OpenAI-shaped 503 with Retry-After (it was a 500),
and the same request answers 200 again once Redis runs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import aiohttp

from gateway.admin.routes import USAGE_UNREACHABLE
from keys.cli import main as keys_main
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import assert_openai_error, auth_config, serve_gateway
from tests.support.redis import RedisServer
from tests.support.wait import wait_until

CHAT: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2}



def generate(redis_url: str, operator: Path, name: str, *options: str) -> tuple[str, str]:
    """A key made by the CLI in the fleet's Redis, as an operator makes one: (id, secret)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = keys_main(["--keys-file", str(operator / "keys.json"),
                        "--usage-db", str(operator / "usage.db"),
                        "generate", "--name", name, "--json", *options],
                       environ={"REDIS_URL": redis_url})
    assert rc == 0, out.getvalue()
    created = json.loads(out.getvalue())
    return created["id"], created["secret"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_usage_is_503_while_redis_is_paused_and_200_once_it_runs(
        tmp_path: Path, redis_server: RedisServer, metered_fake: FakeLlama,
        http: aiohttp.ClientSession) -> None:
    _, admin = generate(redis_server.url, tmp_path / "operator", "ops", "--scopes", "admin")
    app_id, app = generate(redis_server.url, tmp_path / "operator", "app")
    # a short REDIS_TIMEOUT: each read of the paused Redis gives up after it
    config = auth_config(tmp_path, redis_url=redis_server.url, redis_timeout=0.3)

    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        async def usage() -> tuple[int, str | None, Any]:
            async with http.get(gw.url + "/admin/usage", headers=bearer(admin)) as r:
                return r.status, r.headers.get("Retry-After"), await r.json()

        async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(app)) as r:
            assert r.status == 200
        status, _, body = await usage()
        assert status == 200, body
        assert [(row["key_id"], row["requests"]) for row in body["data"]] == [(app_id, 1)]

        redis_server.pause()
        status, retry_after, body = await usage()
        assert (status, retry_after) == (503, "2"), body
        error = assert_openai_error(body, "service_unavailable", "fleet_unavailable")
        assert error["message"] == USAGE_UNREACHABLE

        redis_server.resume()

        async def answered() -> Any:
            status, _, body = await usage()
            return body if status == 200 else None

        body = await wait_until(answered, "/admin/usage to answer 200 once Redis runs again")
        assert [(row["key_id"], row["requests"]) for row in body["data"]] == [(app_id, 1)]


async def test_a_key_reload_is_503_while_redis_is_down(
        tmp_path: Path, redis_server: RedisServer, metered_fake: FakeLlama,
        http: aiohttp.ClientSession) -> None:
    """POST /admin/keys/reload cannot read the fleet's key set while Redis is down: 503 with
    Retry-After (the keys in force stay), and 200 again once it answers."""
    _, admin = generate(redis_server.url, tmp_path / "operator", "ops", "--scopes", "admin")
    config = auth_config(tmp_path, redis_url=redis_server.url, redis_timeout=0.3)

    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        async def reload() -> tuple[int, str | None, Any]:
            async with http.post(gw.url + "/admin/keys/reload", headers=bearer(admin)) as r:
                return r.status, r.headers.get("Retry-After"), await r.json()

        status, _, body = await reload()
        assert status == 200 and body["ok"] is True, body
        redis_server.pause()
        try:
            async def refused() -> Any:
                answer = await reload()
                return answer if answer[0] != 200 else None

            status, retry_after, body = await wait_until(refused, "a reload refused")
            assert (status, retry_after) == (503, "2"), body
            assert_openai_error(body, "service_unavailable", "fleet_unavailable")
        finally:
            redis_server.resume()

        async def reloaded() -> Any:
            status, _, body = await reload()
            return body if status == 200 else None

        body = await wait_until(reloaded, "a reload once Redis runs again")
        assert body["ok"] is True and body["keys"] == 1
