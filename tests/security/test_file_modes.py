"""Data files are the owner's alone (issue 21): every file the service creates under DATA_DIR
or the runtime directory is 0600 and those directories 0700, whatever the umask. Each store is
created here as the service creates it, under a permissive umask (022, the usual default)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.models.jobs import JobState, JobStore
from backend.models.overrides import Override, OverrideStore
from core import runtime
from gateway.policy import shared_limits
from keys.db import open_db
from keys.hashing import hash_secret, new_key_id
from keys.model import ApiKey
from keys.store import KeyStore
from keys.usage_recorder import UsageRecorder


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_private(directory: Path, names: set[str]) -> None:
    """``directory`` is 0700, holds (at least) ``names``, and every file in it is 0600."""
    assert mode(directory) == 0o700, (directory, oct(mode(directory)))
    assert names <= {p.name for p in directory.iterdir()}
    modes = {p.name: oct(mode(p)) for p in directory.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o600)}, modes


async def test_the_usage_database_and_its_wal_and_shm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    recorder = UsageRecorder(data / "usage.db", flush_interval=0.05)
    await recorder.open()
    recorder.record("key_1", "tiny", 3, 4, 1_700_000_000.0)
    assert await recorder.flush() > 0
    assert_private(data, {"usage.db", "usage.db-wal", "usage.db-shm"})  # while it is open
    await recorder.close()
    assert_private(data, {"usage.db"})


def test_the_cli_opens_the_usage_database_private(tmp_path: Path) -> None:
    data = tmp_path / "a" / "data"  # directories it creates on the way are private too
    conn = open_db(data / "usage.db")
    try:
        with conn:
            conn.execute("INSERT INTO key_last_used VALUES ('key_1', 1.0)")
        assert_private(data, {"usage.db", "usage.db-wal", "usage.db-shm"})
        assert mode(tmp_path / "a") == 0o700
    finally:
        conn.close()


def test_a_database_left_readable_by_an_older_version_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    for name in ("usage.db", "usage.db-wal", "usage.db-shm"):
        (data / name).touch(mode=0o644)
        os.chmod(data / name, 0o644)
    open_db(data / "usage.db").close()
    assert_private(data, {"usage.db"})


def test_the_keys_file_and_its_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = ApiKey(id=new_key_id(), name="app", secret_hash=hash_secret("lg-x"), prefix="lg-x",
                 scopes=frozenset({"inference"}), created=1.0)
    KeyStore(data / "keys.json").update(lambda keys: ((*keys, key), None))
    assert_private(data, {"keys.json"})


def test_the_pull_jobs_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = JobStore(data / "pulls.sqlite3", clock=lambda: 1_700_000_000.0)
    try:
        job, _ = store.submit("org/repo", "m.gguf", "main")
        store.transition(job.id, JobState.RUNNING)
        assert_private(data, {"pulls.sqlite3", "pulls.sqlite3-wal", "pulls.sqlite3-shm"})
    finally:
        store.close()


def test_the_model_overrides_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    OverrideStore(data / "model_overrides.json").set("tiny", Override(ctx_size=512))
    assert_private(data, {"model_overrides.json"})


def test_the_runtime_directory_and_its_state_files(tmp_path: Path) -> None:
    directory = runtime.make_runtime_dir(tmp_path)
    runtime.write_state(directory / runtime.SERVE_FILE, {"state": "ready"})
    runtime.write_state(directory / f"{runtime.WORKER_PREFIX}1.json", {"state": "ready"})
    runtime.write_secret(directory / "backend.key", "s3cret")
    assert_private(directory, {runtime.SERVE_FILE, f"{runtime.WORKER_PREFIX}1.json", "backend.key"})


def test_the_shared_rate_limit_table(tmp_path: Path) -> None:
    table = tmp_path / "limits.bin"
    table.write_bytes(b"")
    table.chmod(0o644)  # one an older version left readable to all
    shared_limits.create(table, workers=2)
    assert mode(table) == 0o600
