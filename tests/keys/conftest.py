"""Fixtures for the keys tests: temp paths, a settable clock, an in-process CLI runner."""

from pathlib import Path

import pytest

from keys.cli import main
from tests.keys.helpers import Cli, CliResult, FakeClock, Paths


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
