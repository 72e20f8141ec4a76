"""Shared helpers for the pull tests."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from backend.models.hub import HubClient
from backend.models.jobs import Job, JobStore
from backend.models.pull import PullManager, PullSettings

from .fakehub import FakeHub

DEADLINE_S = 15.0


def manager(
    hub: FakeHub | str, models_dir: Path, data_dir: Path, **kwargs: Any
) -> tuple[PullManager, JobStore]:
    """A PullManager on ``hub`` with quick progress and retries; kwargs set PullSettings."""
    store = JobStore(data_dir / "jobs.sqlite3", clock=time.time)
    endpoint = hub if isinstance(hub, str) else hub.endpoint
    hooks = {k: kwargs.pop(k) for k in ("free_space", "on_success") if k in kwargs}
    settings = PullSettings(**{"progress_interval_s": 0.05, "backoff_s": 0.01, **kwargs})
    return PullManager(store, models_dir, HubClient(endpoint), settings, **hooks), store


async def finished(pulls: PullManager, job: Job) -> Job:
    async with asyncio.timeout(DEADLINE_S):
        return await pulls.wait(job.id)


async def pull_one(pulls: PullManager, repo: str, file: str, revision: str | None = None) -> Job:
    """Start ``pulls``, run one pull to its end, stop it; the finished job."""
    await pulls.start()
    try:
        return await finished(pulls, pulls.submit(repo, file, revision))
    finally:
        await pulls.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(models_dir: Path) -> list[Path]:
    folder = models_dir / ".partial"
    return sorted(folder.glob("*.part")) if folder.is_dir() else []
