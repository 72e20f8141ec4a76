"""serve's children: a crash is reported to ``on_crash`` before the restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from llamagate.children import Child


async def test_a_crash_is_reported_then_the_child_restarts() -> None:
    crashes = asyncio.Queue[int]()  # the pids reported
    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                  restart=True, on_crash=crashes.put_nowait)
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
                  dict(os.environ), restart=True, on_crash=reported.append)
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
                  restart=True, on_crash=cleanup)
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
