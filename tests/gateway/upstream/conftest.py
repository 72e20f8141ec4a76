"""Fixtures for the upstream tests: a scripted backend (scripted.py) and a gateway in front
of it; the fake upstream and its gateway come from tests/gateway/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gateway.upstream.scripted import Scripted
from tests.support.gateway import Gateway, serve_gateway


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    backend = await Scripted().start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def scripted_gateway(scripted: Scripted, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with serve_gateway(scripted.url, {"DATA_DIR": str(tmp_path / "data")}) as gateway:
        yield gateway
