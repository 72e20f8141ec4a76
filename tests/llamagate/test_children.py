"""serve's children: a crash is reported to ``on_crash`` before the restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from llamagate.children import Child


async def test_a_crash_is_reported_then_the_child_restarts() -> None:
    crashes = asyncio.Queue[int]()
    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                  restart=True, on_crash=lambda: crashes.put_nowait(1))
    await child.start()
    first = child.proc
    watch = asyncio.create_task(child.watch())
    try:
        await asyncio.wait_for(crashes.get(), 10)
        assert first is not None and first.returncode == 3
        await asyncio.wait_for(crashes.get(), 10)  # it was started again, and crashed again
        assert child.proc is not first
    finally:
        await child.stop(5)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def test_a_stopped_child_is_not_reported() -> None:
    reported: list[int] = []
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"],
                  dict(os.environ), restart=True, on_crash=lambda: reported.append(1))
    await child.start()
    watch = asyncio.create_task(child.watch())
    await child.stop(5)
    await asyncio.wait_for(watch, 10)  # watch returns once a stopped child has exited
    assert reported == []
