"""TRUSTED_PROXIES: behind a load balancer, the failed-authentication throttle counts the
client named in X-Forwarded-For, not the balancer; from any other peer the header is ignored."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from gateway.edge.client_address import ClientAddress
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool


@pytest.mark.parametrize(("trusted", "peer", "forwarded", "client"), [
    ((), "10.0.0.1", ["203.0.113.7"], "10.0.0.1"),  # no proxies trusted: the peer
    (("10.0.0.0/8",), "192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # an untrusted peer's header
    (("10.0.0.0/8",), "10.0.0.1", [], "10.0.0.1"),  # a trusted peer that forwarded nothing
    (("10.0.0.0/8",), "10.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    # the client wrote the left part; the proxy appended what it saw
    (("10.0.0.0/8",), "10.0.0.1", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),
    # two trusted hops: the client is the nearest one that is not a proxy
    (("10.0.0.0/8",), "10.0.0.1", ["198.51.100.9, 203.0.113.7, 10.0.0.2"], "203.0.113.7"),
    (("10.0.0.0/8",), "10.0.0.1", ["1.1.1.1", "203.0.113.7"], "203.0.113.7"),  # two header lines
    (("10.0.0.0/8",), "10.0.0.1", ["203.0.113.7, garbage"], "10.0.0.1"),  # no proxy wrote that
    (("10.0.0.0/8",), "10.0.0.1", ["garbage, 10.0.0.2"], "10.0.0.2"),
    (("::1",), "::1", ["2001:db8::5"], "2001:db8::5"),
    # "*": any peer is the proxy, but what the client wrote before its hop is not believed
    (("*",), "192.0.2.1", ["198.51.100.9, 203.0.113.7"], "203.0.113.7"),
    (("*",), "192.0.2.1", [], "192.0.2.1"),
    # proxies that write ports; a dual-stack socket's IPv4 peer
    (("10.0.0.0/8",), "10.0.0.1", ["203.0.113.7:41234"], "203.0.113.7"),
    (("10.0.0.0/8",), "10.0.0.1", ["[2001:db8::5]:443"], "2001:db8::5"),
    (("10.0.0.0/8",), "::ffff:10.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    (("10.0.0.0/8",), None, ["203.0.113.7"], None),
])
def test_client_address(trusted: tuple[str, ...], peer: str | None, forwarded: list[str],
                        client: str | None) -> None:
    assert ClientAddress(trusted).of(peer, forwarded) == client


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_a_guessing_client_behind_the_proxy_is_throttled_alone(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    _, secret = keytool.generate("app")
    config = auth_config(tmp_path, auth_failures_per_minute=2, trusted_proxies=("127.0.0.1",))
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        with caplog.at_level(logging.INFO, "llamagate.gateway.auth"):
            for path in ("/v1/models", "/metrics"):  # the edge server's routes and aiohttp's
                statuses = []
                for _ in range(3):
                    async with http.get(gw.url + path, headers={
                            **_from("203.0.113.7"), "Authorization": "Bearer lg-guess"}) as r:
                        statuses.append(r.status)
                assert statuses == ([401, 401, 429] if path == "/v1/models" else [429] * 3)
        failures = [r for r in caplog.records if r.getMessage() == "authentication failed"]
        assert failures and {getattr(r, "remote", None) for r in failures} == {"203.0.113.7"}
        # writing another address in front does not escape: the proxy appends the real one
        async with http.get(gw.url + "/v1/models", headers={
                **_from("198.51.100.1, 203.0.113.7"), "Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 429
        # everyone else behind the same proxy is unaffected, as is a direct client
        async with http.get(gw.url + "/v1/models", headers={
                **_from("198.51.100.9"), "Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 200
            assert json.loads(await r.read())["object"] == "list"


async def test_the_header_is_ignored_from_untrusted_peers(
        tmp_path: Path, metered_fake: FakeLlama, keytool: KeyTool, http: aiohttp.ClientSession) -> None:
    _, secret = keytool.generate("app")
    config = auth_config(tmp_path, auth_failures_per_minute=2, trusted_proxies=("10.0.0.0/8",))
    async with serve_gateway(metered_fake.url, config, models=METERED.models) as gw:
        for i in range(2):  # a different made-up address each time: all count against 127.0.0.1
            async with http.get(gw.url + "/v1/models", headers={
                    **_from(f"203.0.113.{i}"), "Authorization": "Bearer lg-guess"}) as r:
                assert r.status == 401
        async with http.get(gw.url + "/v1/models", headers={
                **_from("198.51.100.9"), "Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 429
