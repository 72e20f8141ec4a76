"""Fixtures for the gateway tests: a fake backend, the gateway app served on
127.0.0.1 in front of it (layer 2), and an HTTP client session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.support import Gateway, serve_gateway

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def start_gateway(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(MAX_QUEUE_SIZE="1", ...)`: a gateway in front of `fake`,
    configured from those settings (auth off unless given, files under tmp_path);
    stopped after the test."""
    started: list[Gateway] = []

    async def start(**env: str) -> Gateway:
        gateway = await serve_gateway(fake.url, {"DATA_DIR": str(tmp_path / "data"), **env})
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        fake.release.set()  # held requests end, so the gateways stop at once
        for gateway in reversed(started):
            await gateway.stop()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    """A gateway with default settings (auth off) in front of `fake`."""
    return await start_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
