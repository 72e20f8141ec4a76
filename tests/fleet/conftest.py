"""A real redis-server per test: each test starts from an empty Redis, and starting one
takes a few milliseconds (cheaper than cleaning a shared one between tests). It demands a
password, as a managed Redis does, so the URL every client is given carries one."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """redis-server on a free port of 127.0.0.1, up for the test, stopped after it."""
    server = RedisServer(tmp_path, password=secrets.token_urlsafe(16)).start()
    try:
        yield server
    finally:
        server.stop()
