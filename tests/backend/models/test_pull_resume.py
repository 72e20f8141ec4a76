"""A pull survives kill -9: the next PullManager resumes from the partial bytes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from backend.models.jobs import JobState
from tests.support.wait import wait_until

from .fakehub import FakeHub
from .pulling import DEADLINE_S, finished, manager, partials, sha256

CHILD = Path(__file__).with_name("pull_child.py")
SIZE = 4 * 1024 * 1024


async def test_kill_9_mid_download_then_resume(hub: FakeHub, models_dir: Path, data_dir: Path) -> None:
    data = os.urandom(SIZE)
    expected = hub.add_file("org/big", "big.gguf", data)
    hub.switches.chunk_size, hub.switches.chunk_delay_s = 32 * 1024, 0.01  # ~3 MB/s

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        str(models_dir),
        str(data_dir),
        hub.endpoint,
        "org/big",
        "big.gguf",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        job_id = (await asyncio.wait_for(child.stdout.readline(), 15)).decode().strip()
        partial = models_dir / ".partial" / f"{expected}.part"

        def partly_downloaded() -> bool:
            return partial.exists() and partial.stat().st_size >= SIZE // 4

        await wait_until(partly_downloaded, "a quarter of the file on disk", within=DEADLINE_S)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    on_disk = partial.stat().st_size
    assert SIZE // 4 <= on_disk < SIZE
    served_before = hub.body_bytes()
    hub.switches.chunk_delay_s = 0

    pulls, store = manager(hub, models_dir, data_dir)
    assert store.get(job_id).state is JobState.RUNNING  # as the killed process left it
    await pulls.start()
    try:
        job = await finished(pulls, store.get(job_id))
    finally:
        await pulls.close()

    assert job.state is JobState.DONE, job.error
    assert sha256(models_dir / "big.gguf") == expected
    fetched_again = hub.body_bytes() - served_before
    assert fetched_again == SIZE - on_disk < SIZE
    assert hub.log[-1].range == f"bytes={on_disk}-"
    assert partials(models_dir) == []
