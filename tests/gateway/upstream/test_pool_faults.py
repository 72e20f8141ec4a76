"""The upstream pool's faults that real llama-servers will not produce on demand, in front of
two fake ones: a 503 (loading) is sent once to the other upstream and ejects its sender;
5xx answers pass through and eject after three in a row; a connection dropped unanswered is
retried; a stream that dies after its head is never sent again; an upstream that refuses the
gateway's key is routed around."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

from backend.upstreams import UpstreamSpec
from core.config import load_config
from gateway.app import Wiring, create_app, serve
from gateway.state import APP_STATE
from gateway.upstream.outlier import CONSECUTIVE
from gateway.upstream.pool import Pool
from tests.support.fake_llama import BACKEND_KEY, MODEL, FakeLlama
from tests.support.gateway import sse_data


@contextlib.asynccontextmanager
async def pool_gateway(*backends: FakeLlama) -> AsyncIterator[tuple[str, Pool]]:
    """The gateway with the fakes as its pool (no affinity: the first drawn of equals wins,
    so requests go to the first fake while it may take them), both probed ready."""
    config = load_config({"AUTH_ENABLED": "false", "POOL_AFFINITY": "false",
                          "BACKEND_URLS": ",".join(b.url for b in backends)})
    specs = tuple(UpstreamSpec(b.url, BACKEND_KEY) for b in backends)
    app = create_app(config, Wiring(backend_url=backends[0].url, backend_key=BACKEND_KEY,
                                    runtime_dir=None, models=(MODEL,), upstreams=specs))
    pool = app[APP_STATE].pool
    assert pool is not None
    pool.apply({"upstreams": [{"ready": True, "state": "ready", "models": [MODEL], "slots": 4,
                               "busy": 0} for _ in backends]})
    served = await serve(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{served.port}", pool
    finally:
        await served.close()


async def chat(http: aiohttp.ClientSession, url: str, stream: bool = False
               ) -> tuple[int, str]:
    async with http.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream}) as r:
        return r.status, await r.text()


async def test_a_loading_upstream_is_retried_elsewhere_and_ejected(fake: FakeLlama) -> None:
    loading = FakeLlama()
    await loading.start()
    loading.switches.status = 503
    try:
        async with pool_gateway(loading, fake) as (url, pool), aiohttp.ClientSession() as http:
            for _ in range(3):
                status, _ = await chat(http, url)
                assert status == 200
            assert len(loading.requests()) == 1  # ejected at its first 503
            assert len(fake.requests()) == 3
            first = pool.members[0]
            assert first.errors == {"loading": 1} and first.ejections == 1
            assert first.outlier.reason == "loading"
    finally:
        await loading.close()


async def test_5xx_pass_through_and_eject_after_three_in_a_row(fake: FakeLlama) -> None:
    failing = FakeLlama()
    await failing.start()
    failing.switches.status = 500
    try:
        async with pool_gateway(failing, fake) as (url, pool), aiohttp.ClientSession() as http:
            statuses = [(await chat(http, url))[0] for _ in range(CONSECUTIVE + 2)]
            # the backend's own error, never sent again: it may have done the work
            assert statuses == [500] * CONSECUTIVE + [200, 200]
            assert pool.members[0].ejections == 1 and len(failing.requests()) == CONSECUTIVE
    finally:
        await failing.close()


async def test_a_dropped_request_is_retried_and_a_broken_stream_is_not(fake: FakeLlama) -> None:
    flaky = FakeLlama()
    await flaky.start()
    try:
        async with pool_gateway(flaky, fake) as (url, pool), aiohttp.ClientSession() as http:
            flaky.switches.drop_requests = 1  # closed unanswered: no byte reached the client
            status, _ = await chat(http, url)
            assert status == 200 and len(fake.requests()) == 1
            assert pool.members[0].errors == {"broken": 1}

            flaky.switches.die_after = 1  # the stream's head and an event, then the end
            status, text = await chat(http, url, stream=True)
            assert status == 200
            error = sse_data(text)[-1]
            assert "backend_disconnected" in error, text
            assert len(fake.requests()) == 1  # never sent again
            assert pool.members[0].errors == {"broken": 2}
    finally:
        await flaky.close()


async def test_an_upstream_refusing_the_key_is_routed_around(fake: FakeLlama) -> None:
    other = FakeLlama()
    await other.start()
    other.switches.status = 401
    try:
        async with pool_gateway(other, fake) as (url, pool), aiohttp.ClientSession() as http:
            statuses = [(await chat(http, url))[0] for _ in range(CONSECUTIVE + 1)]
            assert statuses == [200] * (CONSECUTIVE + 1)  # each refusal sent to the other
            assert pool.members[0].errors == {"auth": CONSECUTIVE}
            assert pool.members[0].ejections == 1
    finally:
        await other.close()
