"""serve's children: a crash is reported to ``on_crash`` and logged before the restart;
every child starts with SIGHUP ignored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from llamagate.children import Child
from tests.support.wait import wait_until


async def test_a_crash_is_reported_then_the_child_restarts() -> None:
    crashes = asyncio.Queue[int]()  # the pids reported
    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                  on_crash=crashes.put_nowait)
    await child.start()
    first = child.proc
    assert first is not None
    watch = asyncio.create_task(child.watch())
    try:
        assert await asyncio.wait_for(crashes.get(), 10) == first.pid  # the dead child's
        assert first.returncode == 3
        second = await asyncio.wait_for(crashes.get(), 10)  # started again, crashed again
        assert child.proc is not first and second != first.pid
    finally:
        await child.stop(5)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def test_a_stopped_child_is_not_reported() -> None:
    reported: list[int] = []
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"],
                  dict(os.environ), on_crash=reported.append)
    await child.start()
    watch = asyncio.create_task(child.watch())
    await child.stop(5)
    await asyncio.wait_for(watch, 10)  # watch returns once a stopped child has exited
    assert reported == []


async def test_a_failing_cleanup_does_not_stop_the_restart() -> None:
    started = asyncio.Queue[int]()

    def cleanup(pid: int) -> None:
        started.put_nowait(pid)
        raise OSError("cannot clean up")

    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                  on_crash=cleanup)
    await child.start()
    watch = asyncio.create_task(child.watch())
    try:
        first = await asyncio.wait_for(started.get(), 10)
        assert await asyncio.wait_for(started.get(), 10) != first  # restarted all the same
    finally:
        await child.stop(5)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


def _ignored(pid: int, sig: signal.Signals) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    raise AssertionError(f"no SigIgn for {pid}")


async def test_a_child_starts_with_sighup_ignored() -> None:
    # it shares serve's process group: a terminal hangup or `tini -g` must not kill it
    # before it has a handler, and one that never installs a handler is never killed
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"],
                  dict(os.environ))
    await child.start()
    try:
        assert child.proc is not None and _ignored(child.proc.pid, signal.SIGHUP)
    finally:
        await child.stop(5)


async def test_a_death_by_signal_is_logged_with_its_name_then_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"],
                  dict(os.environ))
    await child.start()
    child.supervise()
    try:
        assert child.proc is not None
        first = child.proc
        first.send_signal(signal.SIGKILL)
        await wait_until(lambda: child.proc is not first, "the restart", within=10)
        [record] = [r for r in caplog.records if "exited unexpectedly" in r.getMessage()]
        assert record.levelno == logging.ERROR
        fields = vars(record)
        assert (fields["child"], fields["child_pid"], fields["signal"]) == (
            "sleeper", first.pid, "SIGKILL")
        assert "signal SIGKILL" in record.getMessage()
    finally:
        await child.stop(5)
    assert child.proc.returncode is not None  # stop() ended the restarted one too
