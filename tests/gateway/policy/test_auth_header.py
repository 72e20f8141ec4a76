"""AUTH_HEADER: which key counts when a request carries both `Authorization: Bearer` and
`x-api-key`, as behind RunPod's load balancer (its own key in Authorization, the client's
llamagate key in x-api-key). The gateway is served before the fake llama-server."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.policy.auth import presented_secret
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
RUNPOD_KEY = "rpa_the-balancers-own-key"


@pytest.mark.parametrize(("headers", "secret"), [
    ({"Authorization": "Bearer s1", "x-api-key": "s2"}, "s2"),
    ({"Authorization": "Bearer s1"}, "s1"), ({"x-api-key": "s2"}, "s2"),
    ({"Authorization": "Bearer s1", "x-api-key": " "}, "s1"), ({}, None),
])
def test_x_api_key_wins_when_preferred(headers: dict[str, str], secret: str | None) -> None:
    assert presented_secret(make_mocked_request("GET", "/", headers=headers).headers,
                            "x-api-key") == secret
    assert presented_secret({k.lower(): v for k, v in headers.items()}, "x-api-key") == secret


async def test_both_headers_sent(tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool,
                                 http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("app")
    both = {"Authorization": f"Bearer {RUNPOD_KEY}", "x-api-key": secret}
    # the default: the bearer token is the key, so the RunPod recipe is refused, and after
    # AUTH_FAILURES_PER_MINUTE refusals the address is throttled
    async with serve_gateway(metered_fake.url, auth_config(tmp_path, auth_failures_per_minute=2),
                             models=METERED.models) as gw:
        statuses = []
        for _ in range(3):
            async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=both) as r:
                statuses.append(r.status)
        assert statuses == [401, 401, 429]
    # AUTH_HEADER=x-api-key: the llamagate key in x-api-key is the one looked at, every time
    config = auth_config(tmp_path, auth_failures_per_minute=2, auth_header="x-api-key")
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        for _ in range(4):
            async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=both) as r:
                assert r.status == 200, await r.text()
        # a client that sends only the bearer token (no balancer in front) still gets in
        async with http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 200
    assert metered_fake.routes(listing=False) == ["POST /v1/chat/completions"] * 4
