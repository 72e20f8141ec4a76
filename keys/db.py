"""The SQLite database holding usage counters and the audit log.

WAL mode lets the gateway's flusher write while the CLI reads. ``synchronous=NORMAL`` may lose
the last commits on power loss (never on a process crash), an acceptable trade for counters that
are written every second.
"""

import sqlite3
from pathlib import Path
from typing import Final

from core.private_files import private_sqlite

SCHEMA_VERSION: Final = 2
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS usage_hourly (
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, model, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_hourly_hour ON usage_hourly (hour);
CREATE TABLE IF NOT EXISTS key_last_used (
    key_id TEXT PRIMARY KEY,
    ts REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
-- tokens of usage spools whose rows are counted (keys/usage_spool.py): a spool is applied once
CREATE TABLE IF NOT EXISTS usage_spools_applied (
    token TEXT PRIMARY KEY,
    ts REAL NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""


def open_db(path: Path, *, busy_timeout: float = 10.0, any_thread: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the usage/audit database at ``path``.

    ``any_thread`` allows use from worker threads; the caller must then serialise access.
    """
    private_sqlite(path)  # 0600, and so its -wal and -shm files (core/private_files.py)
    conn = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=not any_thread)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn
