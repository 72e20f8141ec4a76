from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from backend.models.errors import BadPullRequest, UnsafePath
from backend.models.jobs import Job, JobState
from backend.models.overrides import OverrideStore
from backend.models.registry import ModelRegistry
from tests.support.wait import wait_until

from .fakehub import FakeHub
from .ggufs import write_tiny
from .pulling import DEADLINE_S, finished, manager, partials, pull_one, sha256

REPO = "org/models"


async def test_pull_reports_progress_verifies_and_triggers_rescan(
    hub: FakeHub, models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    data = write_tiny(tmp_path / "src.gguf").read_bytes()
    expected = hub.add_file(REPO, "tiny-q.gguf", data)
    hub.switches.chunk_size, hub.switches.chunk_delay_s = 8 * 1024, 0.01  # ~0.4 s

    registry = ModelRegistry(models_dir, OverrideStore(data_dir / "overrides.json"))
    rescans: list[Path] = []

    async def rescan(path: Path) -> None:
        rescans.append(path)
        registry.scan()

    pulls, store = manager(hub, models_dir, data_dir, on_success=rescan)
    await pulls.start()
    try:
        job = pulls.submit(REPO, "tiny-q.gguf")
        seen: list[Job] = []

        def record() -> bool:
            seen.append(pulls.get(job.id))
            return not seen[-1].active

        await wait_until(record, "the pull to finish", within=DEADLINE_S)
        done = await finished(pulls, job)
    finally:
        await pulls.close()

    assert done.state is JobState.DONE and done.error is None
    assert done.bytes_done == done.bytes_total == len(data)
    dest = models_dir / "tiny-q.gguf"
    assert done.paths == (str(dest),) and done.files == ("tiny-q.gguf",)
    assert sha256(dest) == expected
    running = [j for j in seen if j.state is JobState.RUNNING and j.bytes_total]
    middle = {j.bytes_done for j in running if 0 < j.bytes_done < len(data)}
    assert len(middle) >= 2, "progress must be reported while the bytes arrive"
    assert any(j.rate and j.rate > 0 and j.eta is not None for j in running)
    assert rescans == [dest]
    assert registry.get("tiny-q").status == "ok"
    assert partials(models_dir) == []


async def test_same_pull_shares_one_job(hub: FakeHub, models_dir: Path, data_dir: Path) -> None:
    hub.add_file(REPO, "m.gguf", os.urandom(1000))
    pulls, _ = manager(hub, models_dir, data_dir)
    first = pulls.submit(REPO, "m.gguf")
    assert pulls.submit(REPO, "m.gguf", "main").id == first.id
    assert pulls.submit(REPO, "m.gguf", "other-branch").id != first.id
    await pulls.start()
    try:
        assert (await finished(pulls, first)).state is JobState.DONE
    finally:
        await pulls.close()
    assert [j.id for j in pulls.list()][-1] == first.id


async def test_cancel_running_pull_removes_partial(hub: FakeHub, models_dir: Path, data_dir: Path) -> None:
    hub.add_file(REPO, "m.gguf", os.urandom(2_000_000))
    hub.switches.chunk_size, hub.switches.chunk_delay_s = 16 * 1024, 0.01
    pulls, _ = manager(hub, models_dir, data_dir)
    await pulls.start()
    try:
        job = pulls.submit(REPO, "m.gguf")
        await wait_until(lambda: pulls.get(job.id).bytes_done > 0, "bytes to arrive", within=DEADLINE_S)
        cancelled = await pulls.cancel(job.id)
        assert cancelled.state is JobState.CANCELLED
        assert (await pulls.cancel(job.id)).state is JobState.CANCELLED  # idempotent
        assert partials(models_dir) == []
        assert not (models_dir / "m.gguf").exists()

        # The partial's lock is released: the same pull can start again at once.
        hub.switches.chunk_delay_s = 0
        again = pulls.submit(REPO, "m.gguf")
        assert again.id != job.id
        assert (await finished(pulls, again)).state is JobState.DONE
    finally:
        await pulls.close()


async def test_cancel_queued_pull_never_starts(hub: FakeHub, models_dir: Path, data_dir: Path) -> None:
    hub.add_file(REPO, "a.gguf", os.urandom(500_000))
    hub.add_file(REPO, "b.gguf", os.urandom(1000))
    hub.switches.chunk_size, hub.switches.chunk_delay_s = 16 * 1024, 0.01
    pulls, _ = manager(hub, models_dir, data_dir, concurrency=1)
    await pulls.start()
    try:
        first = pulls.submit(REPO, "a.gguf")
        second = pulls.submit(REPO, "b.gguf")
        assert (await pulls.cancel(second.id)).state is JobState.CANCELLED
        assert (await finished(pulls, first)).state is JobState.DONE
    finally:
        await pulls.close()
    assert not any("b.gguf" in s.path for s in hub.log)


@pytest.mark.parametrize(
    ("repo", "file", "code", "message"),
    [
        ("org/absent", "m.gguf", "remote_not_found", "repository org/absent not found"),
        (REPO, "absent.gguf", "remote_not_found", "no file 'absent.gguf' in org/models at main"),
        ("org/gated", "m.gguf", "access_denied", "is gated. Accept its conditions"),
    ],
)
async def test_hub_errors_fail_the_job_with_an_actionable_message(
    hub: FakeHub, models_dir: Path, data_dir: Path, repo: str, file: str, code: str, message: str
) -> None:
    hub.add_file(REPO, "m.gguf", b"x")
    hub.add_file("org/gated", "m.gguf", b"x")
    hub.switches.gated.add("org/gated")
    job = await pull_one(manager(hub, models_dir, data_dir)[0], repo, file)
    assert job.state is JobState.FAILED and job.error_code == code
    assert job.error is not None and message in job.error


async def test_unreachable_hub_fails_with_network_advice(models_dir: Path, data_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    job = await pull_one(manager(closed, models_dir, data_dir)[0], REPO, "m.gguf")
    assert job.state is JobState.FAILED and job.error_code == "hub_unavailable"
    assert job.error is not None and "cannot reach" in job.error and "HF_ENDPOINT" in job.error


@pytest.mark.parametrize("spec", ["m.gguf", "*.gguf"])  # a pattern lists the repo first
async def test_a_hub_down_for_a_moment_before_the_download_is_retried(
    hub: FakeHub, models_dir: Path, data_dir: Path, spec: str
) -> None:
    expected = hub.add_file(REPO, "m.gguf", os.urandom(10_000))
    hub.switches.down_for = 3
    job = await pull_one(manager(hub, models_dir, data_dir, retries=3)[0], REPO, spec)
    assert job.state is JobState.DONE, job.error
    assert sha256(models_dir / "m.gguf") == expected
    assert [s.status for s in hub.log][:3] == [503, 503, 503]


async def test_a_hub_that_stays_down_fails_after_the_retries(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    hub.add_file(REPO, "m.gguf", b"x")
    hub.switches.down_for = 100
    job = await pull_one(manager(hub, models_dir, data_dir, retries=2)[0], REPO, "m.gguf")
    assert job.state is JobState.FAILED and job.error_code == "hub_unavailable"
    assert [s.status for s in hub.log] == [503, 503, 503]  # the first try and two retries


async def test_not_enough_disk_space_fails_before_downloading(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    hub.add_file(REPO, "m.gguf", os.urandom(100_000))
    job = await pull_one(manager(hub, models_dir, data_dir, free_space=lambda _path: 4096)[0], REPO, "m.gguf")
    assert job.state is JobState.FAILED and job.error_code == "not_enough_space"
    assert job.error is not None and "only 4.0 KiB free" in job.error
    assert hub.body_bytes() == 0


@pytest.mark.parametrize("file", ["../escape.gguf", "/etc/passwd", "a/../../b.gguf"])
async def test_paths_escaping_models_dir_are_refused_at_submit(
    hub: FakeHub, models_dir: Path, data_dir: Path, file: str
) -> None:
    pulls, _ = manager(hub, models_dir, data_dir)
    with pytest.raises(UnsafePath, match="must be a path inside MODELS_DIR"):
        pulls.submit(REPO, file)
    with pytest.raises(BadPullRequest):
        pulls.submit("../etc", "m.gguf")
    assert pulls.list() == []


async def test_dropped_connection_is_resumed_with_a_range(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    data = os.urandom(600_000)
    expected = hub.add_file(REPO, "m.gguf", data)
    hub.switches.fail_after_bytes, hub.switches.fail_times = 250_000, 2
    job = await pull_one(manager(hub, models_dir, data_dir)[0], REPO, "m.gguf")
    assert job.state is JobState.DONE, job.error
    assert sha256(models_dir / "m.gguf") == expected
    ranges = [s.range for s in hub.log if s.path.startswith("/cdn/")]
    assert ranges == [None, "bytes=250000-", "bytes=500000-"]
    assert hub.body_bytes() == len(data)  # nothing fetched twice


async def test_wrong_sha256_fails_and_discards_the_bytes(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    hub.add_file(REPO, "m.gguf", os.urandom(50_000))
    hub.switches.corrupt.add("m.gguf")
    job = await pull_one(manager(hub, models_dir, data_dir)[0], REPO, "m.gguf")
    assert job.state is JobState.FAILED and job.error_code == "verification_failed"
    assert job.error is not None and "does not match the Hub's" in job.error
    assert partials(models_dir) == [] and not (models_dir / "m.gguf").exists()


async def test_existing_destination(hub: FakeHub, models_dir: Path, data_dir: Path) -> None:
    same = os.urandom(10_000)
    hub.add_file(REPO, "same.gguf", same)
    hub.add_file(REPO, "other.gguf", os.urandom(10_000))
    (models_dir / "same.gguf").write_bytes(same)
    (models_dir / "other.gguf").write_bytes(b"an operator's own file")
    pulls, _ = manager(hub, models_dir, data_dir)
    await pulls.start()
    try:
        present = await finished(pulls, pulls.submit(REPO, "same.gguf"))
        clash = await finished(pulls, pulls.submit(REPO, "other.gguf"))
    finally:
        await pulls.close()
    assert present.state is JobState.DONE and hub.body_bytes() == 0
    assert clash.state is JobState.FAILED and clash.error_code == "destination_exists"
    assert (models_dir / "other.gguf").read_bytes() == b"an operator's own file"


async def test_pattern_pulls_every_part_of_a_split_model(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    parts = [os.urandom(30_000), os.urandom(20_000)]
    for n, data in enumerate(parts, start=1):
        hub.add_file(REPO, f"Q8/m-Q8_0-0000{n}-of-00002.gguf", data)
    hub.add_file(REPO, "m-Q4_K_M.gguf", os.urandom(1000))
    job = await pull_one(manager(hub, models_dir, data_dir)[0], REPO, "*Q8_0*")
    assert job.state is JobState.DONE, job.error
    assert job.files == ("Q8/m-Q8_0-00001-of-00002.gguf", "Q8/m-Q8_0-00002-of-00002.gguf")
    assert job.bytes_total == 50_000
    for n, data in enumerate(parts, start=1):
        assert (models_dir / f"Q8/m-Q8_0-0000{n}-of-00002.gguf").read_bytes() == data


@pytest.mark.parametrize("ignore_range", [False, True])
async def test_partial_bytes_from_an_earlier_run_are_reused(
    hub: FakeHub, models_dir: Path, data_dir: Path, ignore_range: bool
) -> None:
    data = os.urandom(300_000)
    expected = hub.add_file(REPO, "m.gguf", data)
    (models_dir / ".partial").mkdir()
    (models_dir / ".partial" / f"{expected}.part").write_bytes(data[:200_000])
    hub.switches.ignore_range = ignore_range
    job = await pull_one(manager(hub, models_dir, data_dir)[0], REPO, "m.gguf")
    assert job.state is JobState.DONE, job.error
    assert sha256(models_dir / "m.gguf") == expected
    # A server that ignores Range sends everything again; the download starts over cleanly.
    assert hub.body_bytes() == (300_000 if ignore_range else 100_000)


async def test_shutdown_requeues_and_next_start_resumes(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    data = os.urandom(1_000_000)
    expected = hub.add_file(REPO, "m.gguf", data)
    hub.switches.chunk_size, hub.switches.chunk_delay_s = 16 * 1024, 0.01
    pulls, store = manager(hub, models_dir, data_dir)
    await pulls.start()
    job = pulls.submit(REPO, "m.gguf")
    await wait_until(lambda: pulls.get(job.id).bytes_done > 100_000, "some bytes", within=DEADLINE_S)
    await pulls.close()
    assert store.get(job.id).state is JobState.QUEUED
    (kept,) = partials(models_dir)
    assert kept.stat().st_size > 0

    hub.switches.chunk_delay_s = 0
    before = hub.body_bytes()
    resumed, _ = manager(hub, models_dir, data_dir)
    await resumed.start()
    try:
        done = await finished(resumed, job)
    finally:
        await resumed.close()
    assert done.state is JobState.DONE
    assert sha256(models_dir / "m.gguf") == expected
    assert hub.body_bytes() - before < len(data)


async def test_interrupted_jobs_fail_when_resume_is_off(
    hub: FakeHub, models_dir: Path, data_dir: Path
) -> None:
    pulls, store = manager(hub, models_dir, data_dir, resume=False)
    job, _ = store.submit(REPO, "m.gguf", "main")
    store.transition(job.id, JobState.RUNNING)  # as a crashed process leaves it
    await pulls.start()
    await pulls.close()
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and failed.error_code == "interrupted"
    assert failed.error is not None and "pull again" in failed.error
