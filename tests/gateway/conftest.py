"""Fixtures for the gateway tests: the fake llama-server (tests/support/fake_llama.py), the
gateway app served on 127.0.0.1 in front of it (layer 2), and an HTTP client session."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, serve_gateway

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(fake: FakeLlama, tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(MAX_QUEUE_SIZE="1", ...)`: a gateway in front of `fake`,
    configured from those settings (auth off unless given, files under tmp_path);
    stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(**env: str) -> Gateway:
            settings = {"DATA_DIR": str(tmp_path / "data"), **env}
            return await stack.enter_async_context(serve_gateway(fake.url, settings))

        try:
            yield start
        finally:
            fake.release.set()  # held requests end, so the gateways stop at once


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    """A gateway with default settings (auth off) in front of `fake`."""
    return await start_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
