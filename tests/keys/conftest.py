"""Fixtures for the keys tests: temp paths, a settable clock, an in-process CLI runner, and
a real redis-server (tests/support/redis.py) with a client of it."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from keys.cli import main
from tests.keys.helpers import Cli, CliResult, FakeClock, Paths
from tests.support.redis import RedisServer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(keys=tmp_path / "data" / "keys.json", db=tmp_path / "data" / "usage.db")


@pytest.fixture
def cli(paths: Paths, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``main`` in-process against the temp store; returns exit code and captured output."""

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        rc = main([*paths.args(), *argv], environ={}, clock=clock)
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)

    return run


@pytest.fixture
def rcli(server: RedisServer, paths: Paths, clock: FakeClock, request: pytest.FixtureRequest,
         capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI with REDIS_URL set (and the local paths given, which it must leave alone),
    under the test module's REDIS_KEY_PREFIX (its ``PREFIX``)."""
    environ = {"REDIS_URL": server.url, "REDIS_KEY_PREFIX": request.module.PREFIX}

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        rc = main([*paths.args(), *argv], clock=clock, environ=environ)
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)
    return run


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """redis-server on a free port of 127.0.0.1, up for the test, stopped after it: no password,
    and no append-only file, so that a restart brings back only what ``save`` wrote."""
    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    """A client of ``server`` that answers bytes."""
    with server.client(decode=False) as c:
        yield c
