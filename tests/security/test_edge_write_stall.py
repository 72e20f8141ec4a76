"""Issue 21, the write-stall risk: a client that stops reading its answer is cut off once its
writes have been paused for WRITE_STALL_TIMEOUT, which cancels its request and frees its
backend slot for everyone else."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from core.config import Config
from tests.support.fake_llama import FakeLlama, Switches
from tests.support.gateway import serve_gateway
from tests.support.rawhttp import Client, json_request
from tests.support.wait import wait_until

CHAT = "/v1/chat/completions"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlama]:
    upstream = FakeLlama(Switches(events=1_000_000))  # a stream longer than any socket buffer
    await upstream.start()
    try:
        yield upstream
    finally:
        upstream.release.set()
        await upstream.close()


async def reader_that_never_reads(port: int) -> Client:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return Client(reader, writer)


async def test_a_client_that_stops_reading_is_cut_and_its_slot_freed(fake: FakeLlama) -> None:
    config = replace(Config(auth_enabled=False), write_stall_timeout=0.5,
                     max_concurrent_requests=1)
    async with serve_gateway(fake.url, config) as gw:
        body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        stuck = await reader_that_never_reads(gw.port)
        try:  # its reader stops taking bytes once its buffer holds 128 KiB
            await stuck.send(json_request(CHAT, body))
            seen = (await fake.wait_for_requests(1, CHAT))[0]
            await wait_until(lambda: seen.client_closed, "the stalled request to be cancelled")
            await wait_until(lambda: gw.state.admission.in_flight == 0, "its slot to be freed")
            # the one slot serves the next client
            fake.switches.events = 3
            client = await Client.sending(gw.port, json_request(CHAT, {**body, "stream": False}))
            try:
                answer = await client.answer()
                assert answer.status == 200, answer
                assert json.loads(answer.body)["choices"]
            finally:
                await client.close()
        finally:
            await stuck.close()
