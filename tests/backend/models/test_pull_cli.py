from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from llamagate.pull_cli import main

from .fakehub import FakeHub
from .pulling import sha256


async def test_cli_pulls_in_the_foreground(
    hub: FakeHub, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = hub.add_file("org/repo", "m.gguf", os.urandom(200_000))
    argv = ["org/repo", "m.gguf", "--models-dir", str(models_dir), "--endpoint", hub.endpoint]
    # The fake Hub runs on this event loop, so the blocking command runs in a thread.
    assert await asyncio.to_thread(main, argv) == 0
    assert sha256(models_dir / "m.gguf") == expected
    out, err = capsys.readouterr()
    dest = await asyncio.to_thread(os.path.realpath, models_dir / "m.gguf")
    assert out.strip() == f"{dest}  sha256={expected}"
    assert "m.gguf" in err  # the progress bar


async def test_cli_reports_failures_clearly(
    hub: FakeHub, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add_file("org/repo", "m.gguf", b"x")
    argv = ["org/repo", "nope.gguf", "--models-dir", str(models_dir), "--endpoint", hub.endpoint]
    assert await asyncio.to_thread(main, [*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llamagate pull: org/repo/nope.gguf@main: no file 'nope.gguf'")

    assert main(["org/repo", "../x.gguf", "--models-dir", str(models_dir), "--quiet"]) == 1
    assert "must be a path inside MODELS_DIR" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
