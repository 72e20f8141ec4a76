import contextlib
import sqlite3
from pathlib import Path

import pytest

from keys.db import open_db
from keys.usage import HOUR, UsageRow, UsageStore, hour_bucket
from keys.usage_recorder import UsageRecorder
from tests.keys.helpers import T0, FakeClock, StepSleep

H0 = hour_bucket(T0)


def rows_on_disk(path: Path) -> list[UsageRow]:
    with contextlib.closing(open_db(path)) as conn:
        return UsageStore(conn).usage()


async def test_record_buffers_until_flush_then_aggregates(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    recorder = UsageRecorder(db)
    await recorder.open()
    try:
        for i in range(100):
            recorder.record("k1", "qwen", 10, 1, H0 + i)
        recorder.record("k1", "qwen", 5, 5, H0 + HOUR + 1)
        assert recorder.pending == 101
        assert rows_on_disk(db) == []  # nothing written on the request path

        assert await recorder.flush() == 101
        assert recorder.pending == 0
        assert await recorder.usage("k1") == [
            UsageRow("k1", "qwen", H0, 100, 1000, 100),
            UsageRow("k1", "qwen", H0 + HOUR, 1, 5, 5),
        ]
        assert await recorder.last_used("k1") == H0 + HOUR + 1
        assert await recorder.flush() == 0
    finally:
        await recorder.close()


async def test_close_flushes_what_is_left(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    recorder = UsageRecorder(db)
    await recorder.open()
    recorder.start()
    recorder.record("k1", "m", 3, 4, T0)
    await recorder.close()
    assert rows_on_disk(db) == [UsageRow("k1", "m", H0, 1, 3, 4)]
    recorder.record("k1", "m", 3, 4, T0)  # after close: dropped, not an error
    assert recorder.dropped == 1


async def test_flusher_task_writes_every_interval(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    sleep = StepSleep()
    recorder = UsageRecorder(db, flush_interval=0.5, sleep=sleep)
    await recorder.open()
    recorder.start()
    try:
        assert await sleep.entered.get() == 0.5
        recorder.record("k1", "m", 1, 2, T0)
        recorder.record("k2", "m", 3, 4, T0)
        await sleep.step()
        assert recorder.pending == 0
        assert len(rows_on_disk(db)) == 2
    finally:
        await recorder.close()


async def test_failed_write_keeps_events_for_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(0.0)
    recorder = UsageRecorder(tmp_path / "usage.db", max_rows=1, clock=clock)
    await recorder.open()
    try:
        real_write = UsageStore.write

        def failing_write(self: UsageStore, *args: object, **kwargs: object) -> list[str]:
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(UsageStore, "write", failing_write)
        recorder.record("k1", "m", 1, 1, T0)
        recorder.record("k1", "m", 1, 1, T0)
        assert await recorder.flush() == 0
        assert recorder.pending == 2
        recorder.record("k1", "m", 1, 1, T0)  # folds into the row kept for retry
        recorder.record("k2", "m", 1, 1, T0)  # would need a second row: over max_rows, dropped
        assert recorder.pending == 3 and recorder.dropped == 1

        monkeypatch.setattr(UsageStore, "write", real_write)
        assert await recorder.flush() == 0  # the retry waits out its backoff
        clock.advance(1.0)
        assert await recorder.flush() == 3
        assert await recorder.usage() == [UsageRow("k1", "m", H0, 3, 3, 3)]
        assert await recorder.last_used("k1") == T0
    finally:
        await recorder.close()


async def test_usage_before_open_is_an_error(tmp_path: Path) -> None:
    recorder = UsageRecorder(tmp_path / "usage.db")
    with pytest.raises(RuntimeError, match="open"):
        await recorder.usage()
    await recorder.close()


async def test_flush_before_open_keeps_events(tmp_path: Path) -> None:
    recorder = UsageRecorder(tmp_path / "usage.db")
    recorder.record("k1", "m", 1, 1, T0)
    with pytest.raises(RuntimeError, match="open"):
        await recorder.flush()
    assert recorder.pending == 1
    await recorder.open()
    await recorder.close()
    assert rows_on_disk(tmp_path / "usage.db") == [UsageRow("k1", "m", H0, 1, 1, 1)]
