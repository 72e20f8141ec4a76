from __future__ import annotations

from pathlib import Path

import pytest

from backend.models.errors import JobNotFound
from backend.models.jobs import JobState, JobStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_submit_shares_the_active_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", clock=Clock())
    job, created = store.submit("org/repo", "m.gguf", "main")
    assert created and job.state is JobState.QUEUED and job.bytes_done == 0
    again, created_again = store.submit("org/repo", "m.gguf", "main")
    assert again.id == job.id and not created_again
    other, created_other = store.submit("org/repo", "m.gguf", "v2")
    assert created_other and other.id != job.id

    store.transition(job.id, JobState.RUNNING)
    store.transition(job.id, JobState.DONE, paths=["/m/m.gguf"])
    fresh, created_fresh = store.submit("org/repo", "m.gguf", "main")
    assert created_fresh and fresh.id != job.id  # a finished job is not shared


def test_transitions_follow_the_state_machine(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", clock=Clock())
    job, _ = store.submit("org/repo", "m.gguf", "main")
    assert store.transition(job.id, JobState.DONE) is None  # queued cannot finish
    running = store.transition(job.id, JobState.RUNNING)
    assert running is not None and running.updated > job.updated
    store.progress(job.id, bytes_done=10, bytes_total=100, rate=5.0, eta=18.0, files=["m.gguf"])
    cancelled = store.transition(job.id, JobState.CANCELLED, error="cancelled by request")
    assert cancelled is not None and cancelled.bytes_done == 10 and cancelled.files == ("m.gguf",)
    assert store.transition(job.id, JobState.RUNNING) is None  # terminal
    store.progress(job.id, bytes_done=99)  # ignored once not running
    assert store.get(job.id).bytes_done == 10


def test_jobs_survive_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", clock=Clock())
    job, _ = store.submit("org/repo", "m.gguf", "main")
    store.transition(job.id, JobState.RUNNING)
    store.close()
    reopened = JobStore(tmp_path / "jobs.db", clock=Clock())
    assert [j.id for j in reopened.active()] == [job.id]
    assert reopened.get(job.id).state is JobState.RUNNING
    assert reopened.recent()[0].to_dict()["state"] == "running"
    with pytest.raises(JobNotFound):
        reopened.get("nope")
