"""Fixtures for the auth, rate limit and admin tests: a fake backend, a key store, and a
check after every test that no secret it created reached a log record."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from core.logs import JsonFormatter
from tests.gateway_auth.fakes import FakeBackend, KeyTool, serve_app


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake = FakeBackend()
    async with serve_app(fake.app()) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release.set()  # let a held stream end so the servers can stop


@pytest.fixture
def keytool(tmp_path: Path) -> KeyTool:
    return KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(autouse=True)
def _no_secret_in_logs(caplog: pytest.LogCaptureFixture, keytool: KeyTool) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    # Formatted as the service formats them, so `extra` fields are searched too.
    formatter = JsonFormatter("test")
    text = "\n".join(formatter.format(r) for r in caplog.records)
    for secret in keytool.secrets:
        assert secret not in text, "a secret reached a log record"
