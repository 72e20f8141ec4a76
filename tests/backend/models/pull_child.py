"""Run one pull in a PullManager until it finishes; the resume test kill -9s it midway.

Usage: python pull_child.py MODELS_DIR DATA_DIR ENDPOINT REPO FILE
Prints the job id on its first line.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from backend.models.hub import HubClient
from backend.models.jobs import JobStore
from backend.models.pull import PullManager, PullSettings


async def main(models_dir: Path, data_dir: Path, endpoint: str, repo: str, file: str) -> int:
    store = JobStore(data_dir / "jobs.sqlite3", clock=time.time)
    settings = PullSettings(progress_interval_s=0.05)
    pulls = PullManager(store, models_dir, HubClient(endpoint), settings)
    await pulls.start()
    try:
        job = pulls.submit(repo, file)
        print(job.id, flush=True)
        done = await pulls.wait(job.id)
        print(done.state.value, flush=True)
    finally:
        await pulls.close()
    return 0


if __name__ == "__main__":
    models, data, endpoint, repo, file = sys.argv[1:6]
    sys.exit(asyncio.run(main(Path(models), Path(data), endpoint, repo, file)))
