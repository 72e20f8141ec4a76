"""Issue 21, the slowloris risk: a request head has HEAD_TIMEOUT to arrive whole from its
first byte, however it trickles (408, then closed), and one client address holds at most
MAX_CONNECTIONS_PER_CLIENT open connections (past it, a new one is closed at once, unanswered)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from core.config import Config
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, serve_gateway
from tests.support.rawhttp import Client, request
from tests.support.wait import wait_until

TRICKLE = 0.05  # seconds between a slow client's header lines: its pace, not a wait


@contextlib.asynccontextmanager
async def gateway(fake: FakeLlama, **settings: Any) -> AsyncIterator[Gateway]:
    async with serve_gateway(fake.url, replace(Config(auth_enabled=False), **settings)) as gw:
        yield gw


async def trickle(client: Client) -> None:
    """A byte of a header every TRICKLE seconds: each read restarts the stall clock."""
    await client.send(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    for _ in range(1000):  # within a header field's 8190 bytes
        await asyncio.sleep(TRICKLE)
        try:
            await client.send(b"x")
        except ConnectionError:
            return


async def test_a_head_that_trickles_past_head_timeout_gets_408(fake: FakeLlama) -> None:
    async with gateway(fake, head_timeout=0.5) as gw:
        client = await Client.connect(gw.port)
        sender = asyncio.create_task(trickle(client))
        try:
            answer = await client.answer(within=10)
            assert answer.status == 408, answer
            assert answer.headers.get("x-request-id") and not answer.keep_alive
            assert await client.closed(within=10)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await client.close()


async def test_the_head_clock_is_not_the_stall_clock(fake: FakeLlama) -> None:
    # a head that arrives whole within head_timeout is served, however many reads it took
    async with gateway(fake, head_timeout=5.0) as gw:
        client = await Client.connect(gw.port)
        try:
            for line in (b"GET /ping HTTP/1.1\r\n", b"Host: a\r\n", b"X-A: b\r\n", b"\r\n"):
                await client.send(line)
            assert (await client.answer()).status == 200
        finally:
            await client.close()


async def test_connections_past_the_cap_per_client_are_closed_at_once(fake: FakeLlama) -> None:
    async with gateway(fake, max_connections_per_client=3) as gw:
        held = [await Client.connect(gw.port) for _ in range(3)]
        extra = await Client.connect(gw.port)
        try:
            assert await extra.closed()  # closed by the server, nothing answered
            for client in held:  # those within the cap are served
                await client.send(request("GET", "/ping"))
                assert (await client.answer()).status == 200
            await held.pop().close()
            await wait_until(lambda: len(gw.served.edge.connections) == 2, "a place to free up")
            again = await Client.sending(gw.port, request("GET", "/ping"))
            held.append(again)
            assert (await again.answer()).status == 200
        finally:
            for client in [*held, extra]:
                await client.close()
