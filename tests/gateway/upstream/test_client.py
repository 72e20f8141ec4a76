"""The proxy's HTTP client to llama-server (gateway/upstream/client.py) against the fake
backend on 127.0.0.1: keep-alive reuse, the pool's bound, chunked and cut-short bodies,
closing what is abandoned, and no resending of a request that left.

The client scenarios run on both event loops: asyncio (what the other tests use) and
uvloop (what gateway workers run), whose transports differ."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from gateway.upstream.client import BackendBroken, BackendConnectError, BackendPool
from tests.gateway.upstream.conftest import Scenario
from tests.support.fake_llama import BACKEND_KEY, FakeLlama
from tests.support.gateway import Gateway, assert_openai_error
from tests.support.service import free_port
from tests.support.wait import wait_until

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = "Content-Type: application/json\r\n"


def body(max_tokens: int = 2, stream: bool = False) -> bytes:
    return json.dumps({"prompt": "a", "max_tokens": max_tokens, "stream": stream}).encode()


async def completion(pool: BackendPool, max_tokens: int = 2) -> tuple[int, bytes]:
    resp = await pool.request("POST", COMPLETIONS, body(max_tokens), JSON)
    return resp.status, await resp.read()


async def reuses_last_connection(pool: BackendPool, fake: FakeLlama) -> bool:
    """One more request: did it go on the connection of the request before it (left idle)?"""
    before = fake.requests(COMPLETIONS)[-1].peer
    assert (await completion(pool))[0] == 200
    return fake.requests(COMPLETIONS)[-1].peer == before


@contextlib.asynccontextmanager
async def open_pool(fake: FakeLlama, size: int = 4) -> AsyncIterator[BackendPool]:
    pool = BackendPool(fake.url, size)
    try:
        yield pool
    finally:
        pool.close()


def test_a_connection_is_reused_for_the_next_request(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        async with open_pool(fake) as pool:
            for n in (1, 2, 3):
                status, data = await completion(pool, n)
                assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == n
            assert len({s.peer for s in fake.requests(COMPLETIONS)}) == 1
            assert await reuses_last_connection(pool, fake)  # kept idle for the next one
    run(scenario)


def test_a_chunked_reply_is_read_whole_and_its_connection_reused(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.chunked_reply = True
        async with open_pool(fake) as pool:
            for _ in range(2):
                status, data = await completion(pool, 5)
                assert status == 200 and json.loads(data)["choices"][0]["text"] == "xxxxx"
            assert len({s.peer for s in fake.requests(COMPLETIONS)}) == 1
    run(scenario)


def test_a_large_body_is_read_whole(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        async with open_pool(fake) as pool:
            status, data = await completion(pool, 600_000)  # many socket reads, past the pause mark
            assert status == 200 and len(json.loads(data)["choices"][0]["text"]) == 600_000
            assert await reuses_last_connection(pool, fake)
    run(scenario)


def test_stream_chunks_are_handed_over_as_they_arrive(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.step = True  # the fake sends event i+1 only once the test has event i
        fake.switches.events = 3
        async with open_pool(fake) as pool:
            resp = await pool.request("POST", COMPLETIONS, body(stream=True), JSON)
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            received = b""
            for i in range(3):
                chunk = await asyncio.wait_for(resp.read_chunk(), 5)
                assert f'"text":"t{i}"'.encode() in chunk
                assert fake.sent_events == i + 1
                fake.proceed.set()
                received += chunk
            while chunk := await asyncio.wait_for(resp.read_chunk(), 5):
                received += chunk
            assert received.endswith(b"data: [DONE]\n\n") and resp.complete
            # finished, but not back in the pool: llama-server closes a streamed answer's
            # connection though its head says keep-alive (test_retry.py has its case)
            assert not await reuses_last_connection(pool, fake)
    run(scenario)


def test_an_abandoned_response_closes_its_connection(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.hang_after = 1  # one event, then the generation "runs on"
        async with open_pool(fake) as pool:
            resp = await pool.request("POST", COMPLETIONS, body(stream=True), JSON)
            assert b"t0" in await asyncio.wait_for(resp.read_chunk(), 5)
            resp.close()
            [seen] = fake.requests(COMPLETIONS)
            await wait_until(seen.finished.is_set, "the backend to see the connection close", within=2)
            assert seen.client_closed  # llama-server would stop generating and free the slot
            fake.switches.hang_after = None
            status, _ = await completion(pool)
            assert status == 200
            assert fake.requests(COMPLETIONS)[-1].peer != seen.peer  # a new connection
    run(scenario)


def test_cancelling_before_the_headers_closes_the_connection(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.hang_before_headers = True
        async with open_pool(fake) as pool:
            task = asyncio.create_task(completion(pool))
            [seen] = await fake.wait_for_requests(1, COMPLETIONS)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(seen.finished.is_set, "the backend to see the connection close", within=2)
            assert seen.client_closed
            fake.switches.hang_before_headers = False
            assert not await reuses_last_connection(pool, fake)
    run(scenario)


def test_a_sent_request_on_a_pooled_connection_closed_unanswered_is_not_retried(
        run: Callable[[Scenario], None]) -> None:
    # the request left: the backend may have begun it, so it is not sent again (the retries
    # the pool does make: tests/gateway/upstream/test_retry.py)
    async def scenario(fake: FakeLlama) -> None:
        async with open_pool(fake) as pool:
            assert (await completion(pool))[0] == 200
            fake.switches.drop_requests = 2  # closed unanswered, twice
            with pytest.raises(BackendBroken):
                await completion(pool)
            first, dropped = fake.requests(COMPLETIONS)
            assert dropped.dropped and dropped.peer == first.peer  # it went out on the pooled one
            fake.switches.drop_requests = 0
            assert not await reuses_last_connection(pool, fake)  # its place is free again
    run(scenario)


def test_a_new_connection_closed_unanswered_is_not_retried(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.drop_requests = 1
        async with open_pool(fake) as pool:
            with pytest.raises(BackendBroken):
                await completion(pool)
            assert len(fake.requests(COMPLETIONS)) == 1  # nothing suggests it was stale
    run(scenario)


def test_a_reply_cut_short_is_broken_and_not_retried(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        async with open_pool(fake) as pool:
            assert (await completion(pool))[0] == 200
            fake.switches.truncate_reply = True
            resp = await pool.request("POST", COMPLETIONS, body(), JSON)
            assert resp.status == 200
            with pytest.raises(BackendBroken):
                await resp.read()
            assert len(fake.requests(COMPLETIONS)) == 2  # the backend had begun: no retry
            fake.switches.truncate_reply = False
            assert not await reuses_last_connection(pool, fake)
    run(scenario)


def test_a_stream_cut_short_hands_over_what_arrived_then_breaks(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.die_after = 2
        async with open_pool(fake) as pool:
            resp = await pool.request("POST", COMPLETIONS, body(stream=True), JSON)
            received = b""
            with pytest.raises(BackendBroken):
                while chunk := await asyncio.wait_for(resp.read_chunk(), 5):
                    received += chunk
            assert b"t0" in received and b"t1" in received and b"[DONE]" not in received
    run(scenario)


def test_the_pool_never_opens_more_than_its_size(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        fake.switches.hang_before_headers = True
        async with open_pool(fake, size=2) as pool:
            tasks = [asyncio.create_task(completion(pool)) for _ in range(4)]
            await fake.wait_for_requests(2, COMPLETIONS)
            assert len(fake.requests(COMPLETIONS)) == 2
            fake.release.set()
            assert [status for status, _ in await asyncio.gather(*tasks)] == [200] * 4
            assert len({s.peer for s in fake.requests(COMPLETIONS)}) == 2
    run(scenario)


def test_an_unreachable_backend_is_a_connect_error(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        pool = BackendPool(f"http://127.0.0.1:{free_port()}", 2)  # nothing listens there
        try:
            for _ in range(3):  # each failed attempt gives its place back: none waits
                with pytest.raises(BackendConnectError):
                    await asyncio.wait_for(completion(pool), 5)
        finally:
            pool.close()
    run(scenario)


def test_a_head_answer_has_no_body_and_its_connection_is_not_reused(
        run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        async with open_pool(fake) as pool:
            resp = await asyncio.wait_for(pool.request("HEAD", "/v1/models"), 5)
            assert resp.status == 200 and await asyncio.wait_for(resp.read(), 5) == b""
            assert (await completion(pool))[0] == 200
            head = await asyncio.wait_for(pool.request("HEAD", COMPLETIONS), 5)  # the fake's 404
            assert head.status == 404 and await asyncio.wait_for(head.read(), 5) == b""
            assert not await reuses_last_connection(pool, fake)
            resp = await pool.request("GET", "/v1/models")
            assert json.loads(await resp.read())["data"][0]["id"] == "tiny"
    run(scenario)


def test_a_body_delimited_by_the_end_of_the_connection(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        # neither Content-Length nor chunked: HTTP/1.1 allows it, the body ends at close
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = BackendPool(f"http://127.0.0.1:{port}", 1)
        try:
            for _ in range(2):  # the closed connection gave its one place back
                resp = await asyncio.wait_for(pool.request("GET", "/v1/models"), 5)
                assert await resp.read() == b"all of it"
        finally:
            pool.close()
            server.close()
            await server.wait_closed()
    run(scenario)


def test_a_connection_that_answers_twice_is_not_reused(run: Callable[[Scenario], None]) -> None:
    async def scenario(fake: FakeLlama) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        connections = []

        async def twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer + answer)  # one request, two answers
            await writer.drain()
            await reader.read()  # until the client closes
            writer.close()

        server = await asyncio.start_server(twice, "127.0.0.1", 0)
        pool = BackendPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 2)
        try:
            for _ in range(2):
                resp = await pool.request("GET", "/v1/models")
                assert await resp.read() == b"ok"
            assert len(connections) == 2  # the second answer could only be misread later
        finally:
            pool.close()
            server.close()
            await server.wait_closed()
    run(scenario)


# -- through the gateway -----------------------------------------------------------------

async def test_gateway_sends_the_backend_key_and_does_not_resend_a_request_that_left(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    for drop in (0, 1, 0):
        fake.switches.drop_requests = drop
        async with http.post(gateway.url + COMPLETIONS, data=body(), headers={
                "Content-Type": "application/json"}) as r:
            if drop:  # it reached the backend, which closed unanswered: not sent again
                assert r.status == 503
                continue
            assert r.status == 200
            assert json.loads(await r.read())["usage"]["completion_tokens"] == 2
    seen = fake.requests(COMPLETIONS)
    assert [s.dropped for s in seen] == [False, True, False]
    assert {s.headers["Authorization"] for s in seen} == {f"Bearer {BACKEND_KEY}"}
    assert all(s.headers["Content-Type"] == "application/json" for s in seen)


async def test_gateway_answers_503_when_the_backend_drops_a_new_connection(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    fake.switches.drop_requests = 1  # the gateway's first request: a new connection
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a"}) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert_openai_error(await r.json(), "service_unavailable", "backend_unavailable")
    assert len(fake.requests(COMPLETIONS)) == 1


async def test_gateway_answers_503_for_a_reply_cut_short(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    fake.switches.truncate_reply = True
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a"}) as r:
        assert r.status == 503
        error = assert_openai_error(await r.json(), "service_unavailable", "backend_unavailable")
    assert "broke" in error["message"]
    assert gateway.state.admission.in_flight == 0


async def test_gateway_relays_a_chunked_reply_byte_for_byte(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 4}) as r:
        plain = await r.read()
    fake.switches.chunked_reply = True
    async with http.post(gateway.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 4}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.read() == plain


# -- what never reaches the backend (issue 21, bug 1) ------------------------------------
