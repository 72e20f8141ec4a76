from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.logs import JsonFormatter
from llamagate.tiny_model import write_model
from tests.support.fake_llama import METERED, FakeLlama
from tests.support.keytool import KeyTool
from tests.support.redis import RedisServer
from tests.support.service import Service

# Fixtures that run the real llama-server: a test using one gets the `llama_server` marker.
LLAMA_SERVER_FIXTURES = frozenset({"service"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LLAMA_SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.llama_server)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Service]:
    """One running service (auth off) shared by a test module."""
    tmp = tmp_path_factory.mktemp("service")
    svc = Service(tmp, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                        "AUTH_ENABLED": "false"})
    with svc.running():
        yield svc


@pytest.fixture
def keytool(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[KeyTool]:
    """The key store under tmp_path/data (where `auth_config` and start_gateway's DATA_DIR
    put it); after the test, no secret it created may be in a log record."""
    caplog.set_level(logging.DEBUG)
    tool = KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")
    yield tool
    # Formatted as the service formats them, so `extra` fields are searched too.
    formatter = JsonFormatter("test")
    text = "\n".join(formatter.format(r) for r in caplog.records)
    for secret in tool.secrets:
        assert secret not in text, "a secret reached a log record"


@contextlib.asynccontextmanager
async def _running(upstream: FakeLlama) -> AsyncIterator[FakeLlama]:
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlama]:
    """The fake llama-server with default switches: one model, streams of `events` events."""
    async with _running(FakeLlama()) as upstream:
        yield upstream


@pytest.fixture
async def metered_fake() -> AsyncIterator[FakeLlama]:
    """The fake with token counts a test can do sums with (fake_llama.METERED)."""
    async with _running(FakeLlama(METERED)) as upstream:
        yield upstream


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server per test (a few milliseconds to start, cheaper than cleaning a
    shared one), on a free port of 127.0.0.1, demanding a password as a managed Redis does:
    the URL every client is given carries it."""
    server = RedisServer(tmp_path, password=secrets.token_urlsafe(16)).start()
    try:
        yield server
    finally:
        server.stop()
