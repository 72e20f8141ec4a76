"""Usage written while `llamagate keys usage` reads it is never lost (issue 22).

A gateway worker holds two connections to usage.db: the usage recorder's and the audit
log's. Setting up the second once opened and closed the database file, which drops every
POSIX lock the process holds on it, the recorder's SQLite lock among them. A reader in
another process that then closed took itself for the database's last user, checkpointed
and deleted the WAL file the recorder was still writing to: every later flush went to an
unlinked file, and usage read while the service ran stayed at zero."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from gateway.admin.routes import Auditor
from keys.usage_recorder import UsageRecorder

READER = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
          "print(c.execute('select coalesce(sum(requests), 0) from usage_hourly').fetchone()[0]);"
          " c.close()")


def _read_elsewhere(db: Path) -> int:
    """What another process (the keys CLI) reads, opening and closing its own connection."""
    out = subprocess.run([sys.executable, "-c", READER, str(db)], capture_output=True,
                         text=True, check=True, timeout=30)
    return int(out.stdout)


async def test_flushes_stay_visible_to_readers_in_other_processes(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    recorder = UsageRecorder(db, flush_interval=60)
    await recorder.open()
    auditor = Auditor(db)  # the worker's second connection, opened after the recorder's
    await auditor.open()
    try:
        for expected in (1, 2, 3):
            recorder.record("key_a", "tiny", 10, 5, time.time())
            assert await recorder.flush() == 1
            # each read opens and closes a connection in another process, as the CLI does
            assert await asyncio.to_thread(_read_elsewhere, db) == expected
        assert (db.with_name(db.name + "-wal")).exists()  # still the writer's, not deleted
    finally:
        await recorder.close()
        await auditor.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("select sum(requests) from usage_hourly").fetchone()[0] == 3
