"""The usage recorder on a database it cannot write (issue 22): it reopens the database once
the file is writable again, keeps what waits in a spool that outlives the process, and the
spools of processes that are gone are written exactly once. The file is made unwritable with
`chattr +i` (tests/support/immutable.py: root and a filesystem with the attribute)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from keys import usage_spool
from keys.db import open_db
from keys.usage import UsageBatch, UsageRow, UsageStore, hour_bucket
from keys.usage_recorder import UsageRecorder
from tests.keys.helpers import REPO_ROOT, T0, FakeClock
from tests.support.immutable import immutable, set_immutable

H0 = hour_bucket(T0)


def rows_on_disk(path: Path) -> list[UsageRow]:
    with contextlib.closing(open_db(path)) as conn:
        return UsageStore(conn).usage()


def made_db(tmp_path: Path) -> Path:
    db = tmp_path / "data" / "usage.db"
    open_db(db).close()
    return db


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def spools(directory: Path) -> list[Path]:
    return sorted(directory.glob("usage-*.json"))


async def test_unwritable_database_is_reopened_once_writable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = made_db(tmp_path)
    clock = FakeClock(0.0)
    seen: list[tuple[int, bool]] = []
    recorder = UsageRecorder(db, spool_dir=tmp_path / "spool", clock=clock)
    recorder.observer = lambda pending, failed: seen.append((pending, failed))
    with immutable(db):
        await recorder.open()  # does not raise: the gateway must start all the same
        assert recorder.report()["ok"] is False and recorder.write_failures == 1
        for _ in range(5):
            recorder.record("k1", "m", 2, 3, T0)
            assert await recorder.flush() == 0
            clock.advance(1.0)
        assert recorder.pending == 5
        report = recorder.report()
        assert report["ok"] is False and report["pending"] == 5 and report["spooled"] is True
        assert "Operation not permitted" in str(report["error"])
        # the metrics hear each flush: the pending count, and each failed attempt
        assert seen[-1] == (5, False) and sum(failed for _, failed in seen) == 3
    clock.advance(10.0)  # past any backoff
    assert await recorder.flush() == 5
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 5, 10, 15)]
    assert recorder.report() == {"ok": True, "pending": 0, "error": None, "failing_since": None,
                                 "spooled": False, "dropped": 0}
    assert spools(tmp_path / "spool") == []  # written: the spool goes
    await recorder.close()
    # once when it started failing, once when it recovered: not at every attempt
    messages = [r.getMessage() for r in caplog.records if r.name == "llamagate.keys"]
    assert len([m for m in messages if "cannot be written" in m]) == 1, messages
    assert len([m for m in messages if "written again" in m]) == 1, messages


async def test_retries_back_off(tmp_path: Path) -> None:
    db = made_db(tmp_path)
    clock = FakeClock(0.0)
    recorder = UsageRecorder(db, clock=clock)
    with immutable(db):
        await recorder.open()
        recorder.record("k1", "m", 1, 1, T0)
        tries = []
        for second in range(40):
            before = recorder.write_failures
            await recorder.flush()
            if recorder.write_failures > before:
                tries.append(second)
            clock.advance(1.0)
        # 1, 2, 4, 8, then every 10 s (RETRY_MAX)
        assert tries == [1, 3, 7, 15, 25, 35]
    await recorder.close()


async def test_a_read_only_connection_is_not_kept(tmp_path: Path) -> None:
    # The failure the issue saw: SQLite opened the file read-only and kept it so. A
    # connection opened through a read-only URI stands for it.
    db = made_db(tmp_path)
    clock = FakeClock(0.0)
    recorder = UsageRecorder(db, clock=clock)
    await recorder.open()
    recorder._conn = conn = open_db_read_only(db)  # noqa: SLF001 (the fault under test)
    recorder._store = UsageStore(conn)  # noqa: SLF001
    recorder.record("k1", "m", 1, 1, T0)
    assert await recorder.flush() == 0
    assert "readonly" in str(recorder.report()["error"])
    clock.advance(1.0)
    assert await recorder.flush() == 1
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 1, 1)]
    await recorder.close()


def open_db_read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)


async def test_close_spools_instead_of_dropping_and_the_next_recorder_writes_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = made_db(tmp_path)
    spool = tmp_path / "spool"
    with immutable(db):
        first = UsageRecorder(db, spool_dir=spool)
        await first.open()
        first.record("k1", "m", 1, 2, T0)
        first.record("k2", "m", 3, 4, T0)
        await first.close()
        assert first.dropped == 0
        assert not [r for r in caplog.records if "dropping" in r.getMessage()]
        [path] = spools(spool)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    second = UsageRecorder(db, spool_dir=spool)
    await second.open()
    await second.flush()  # nothing of its own: it writes what the first one left
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 1, 2), UsageRow("k2", "m", H0, 1, 3, 4)]
    assert spools(spool) == []
    second.record("k1", "m", 1, 2, T0)
    await second.close()
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 2, 2, 4), UsageRow("k2", "m", H0, 1, 3, 4)]


async def test_a_spool_written_but_not_deleted_is_not_counted_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The crash window: the rows and the spool's token are committed, then the process dies
    # before it deletes the spool. The next recorder finds the token and only deletes it.
    db = made_db(tmp_path)
    spool = tmp_path / "spool"
    clock = FakeClock(0.0)
    first = UsageRecorder(db, spool_dir=spool, clock=clock)
    with immutable(db):
        await first.open()
        first.record("k1", "m", 1, 1, T0)
        await first.flush()
        [path] = spools(spool)
    kept = path.read_bytes()
    clock.advance(10.0)
    assert await first.flush() == 1  # committed with the spool's token, and the file deleted
    # ... as if the process had died before the deletion: the file back, its writer gone
    data = json.loads(kept)
    path.write_text(json.dumps({**data, "pid": dead_pid()}))
    await first.close()
    second = UsageRecorder(db, spool_dir=spool)
    await second.open()
    await second.flush()
    assert spools(spool) == []
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 1, 1)]
    await second.close()


_KILLED_WRITER = """
import asyncio, os, signal, sys
from pathlib import Path
from keys.usage_recorder import UsageRecorder

async def main() -> None:
    recorder = UsageRecorder(Path(sys.argv[1]), spool_dir=Path(sys.argv[2]))
    await recorder.open()
    recorder.record("k1", "m", 5, 5, float(sys.argv[3]))
    await recorder.flush()
    assert recorder.spool_path is not None
    os.kill(os.getpid(), signal.SIGKILL)  # a worker killed while its database failed

asyncio.run(main())
"""


def spool_of_a_killed_process(db: Path, spool: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(db), str(spool), str(T0)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr


async def test_a_killed_workers_spool_is_written_once_by_two_recorders(tmp_path: Path) -> None:
    db = made_db(tmp_path)
    spool = tmp_path / "spool"
    with immutable(db):
        spool_of_a_killed_process(db, spool)
    [found] = usage_spool.orphans(spool, "none")[0]
    # two recorders that read the file before either deleted it: the token decides
    with contextlib.closing(open_db(db)) as one, contextlib.closing(open_db(db)) as two:
        nothing = UsageBatch((), {})
        assert UsageStore(one).write(nothing, None, [(found.token, found.batch)]) == [found.token]
        assert UsageStore(two).write(nothing, None, [(found.token, found.batch)]) == []
    a, b = UsageRecorder(db, spool_dir=spool), UsageRecorder(db, spool_dir=spool)
    await a.open()
    await b.open()
    await a.flush()
    await b.flush()
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 5, 5)]
    assert spools(spool) == []
    await a.close()
    await b.close()


async def test_a_killed_workers_spool_waits_for_a_writable_database(tmp_path: Path) -> None:
    db = made_db(tmp_path)
    spool = tmp_path / "spool"
    clock = FakeClock(0.0)
    with immutable(db):
        spool_of_a_killed_process(db, spool)
        recorder = UsageRecorder(db, spool_dir=spool, clock=clock)
        await recorder.open()  # the restarted worker: the database still fails
        await recorder.flush()
        clock.advance(1.0)
        await recorder.flush()
        assert len(spools(spool)) == 1  # the dead worker's, untouched: it holds the events
    clock.advance(10.0)
    await recorder.flush()  # nothing of its own, the spool waited: written now
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 5, 5)]
    assert spools(spool) == []
    await recorder.close()


async def test_a_live_recorders_spool_is_left_to_it(tmp_path: Path) -> None:
    db = made_db(tmp_path)
    spool = tmp_path / "spool"
    clock = FakeClock(0.0)
    with immutable(db):
        alive = UsageRecorder(db, spool_dir=spool, clock=clock)
        await alive.open()
        alive.record("k1", "m", 1, 1, T0)
        await alive.flush()
    other = UsageRecorder(db, spool_dir=spool)
    await other.open()
    other.record("k2", "m", 1, 1, T0)
    await other.flush()
    assert rows_on_disk(db) == [UsageRow("k2", "m", H0, 1, 1, 1)]  # not k1: its writer lives
    assert len(spools(spool)) == 1
    await other.close()
    clock.advance(10.0)
    await alive.flush()
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 1, 1), UsageRow("k2", "m", H0, 1, 1, 1)]
    assert spools(spool) == []
    await alive.close()


def test_the_spool_directory_must_be_private(tmp_path: Path) -> None:
    base = tmp_path / "tmp"
    directory = usage_spool.spool_dir(tmp_path / "usage.db", base)
    directory.parent.mkdir(parents=True, mode=0o777)
    os.chmod(directory.parent, 0o777)  # as another user could have made it, in a shared /tmp
    with pytest.raises(PermissionError, match="not a private directory"):
        usage_spool.write_spool(directory, "usage-1-x.json", b"{}")


def test_spools_of_two_databases_are_apart(tmp_path: Path) -> None:
    assert usage_spool.spool_dir(tmp_path / "a.db") != usage_spool.spool_dir(tmp_path / "b.db")


async def test_unreadable_spool_is_reported_once_and_left(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = made_db(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / "usage-1-bad.json").write_text("{not json")
    recorder = UsageRecorder(db, spool_dir=spool)
    caplog.set_level(logging.ERROR, "llamagate.keys")
    await recorder.open()
    recorder.record("k1", "m", 1, 1, T0)
    await recorder.flush()
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 1, 1)]
    assert [p.name for p in spools(spool)] == ["usage-1-bad.json"]
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1
    await recorder.close()


def test_immutable_helper_clears_the_attribute(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    with immutable(path), pytest.raises(PermissionError):
        path.write_text("y")
    path.write_text("y")
    set_immutable(path, False)  # clearing twice is harmless
