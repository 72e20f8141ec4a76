"""backend/process.py's spawn and exited: a child starts with SIGHUP ignored whatever the
event loop (uvloop's own spawn would set it back to its default), and its exit status is
awaited through a pidfd or, without one, a thread of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import uvloop

from backend.process import exited, spawn

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


def _sighup_ignored(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    raise AssertionError(f"no SigIgn for {pid}")


def test_a_child_spawned_under_uvloop_starts_with_sighup_ignored() -> None:
    # serve runs on uvloop (core.entry.loop_factory), whose libuv spawn resets every signal
    async def spawned() -> tuple[bool, int]:
        proc = spawn(SLEEPER, dict(os.environ))
        ignored = _sighup_ignored(proc.pid)
        proc.send_signal(signal.SIGHUP)  # harmless: it must still be there for the SIGTERM
        proc.terminate()
        return ignored, await asyncio.wait_for(exited(proc), 10)
    assert uvloop.run(spawned()) == (True, -signal.SIGTERM)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "thread"])
async def test_exited_gives_the_exit_status(pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pidfd:
        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError("pidfd_open refused (as a seccomp profile may)")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = spawn([sys.executable, "-c", "raise SystemExit(7)"], dict(os.environ))
    assert await asyncio.wait_for(exited(proc), 10) == 7
    assert await exited(proc) == 7  # reaped: answered from the Popen, not its old pid


async def test_a_waiter_that_gives_up_leaves_the_child_to_the_next() -> None:
    proc = spawn(SLEEPER, dict(os.environ))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(exited(proc), 0.05)  # a stop's grace running out
    proc.kill()
    assert await asyncio.wait_for(exited(proc), 10) == -signal.SIGKILL
