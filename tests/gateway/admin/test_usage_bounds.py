"""/admin/usage's since/until beyond what SQLite's integers hold are the client's 400, not
a 500 (found by the OpenAPI fuzzing with another hypothesis version: since=1e30 raised
OverflowError in the usage query)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool


async def test_an_instant_out_of_range_is_400(tmp_path: Path, metered_fake: FakeLlama,
                                              keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, admin = keytool.generate("ops", "--scopes", "admin")
    headers = {"Authorization": f"Bearer {admin}"}
    async with serve_gateway(metered_fake.url, auth_config(tmp_path), models=METERED.models) as gw:
        for params in ({"since": "1e30"}, {"until": "-1e300"}):
            async with http.get(gw.url + "/admin/usage", params=params, headers=headers) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"]["param"] in params
        async with http.get(gw.url + "/admin/usage", params={"since": "0"}, headers=headers) as r:
            assert r.status == 200
