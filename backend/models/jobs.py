"""Pull jobs, persisted in SQLite under the data dir so they survive restarts and crashes.

State machine::

    queued ──► running ──► done
      │   ▲       │ └────► failed
      │   └───────┘ (shutdown: back to the queue, partial file kept)
      └──────────────────► cancelled ◄── running
    queued ──► failed (could not be resumed)

A partial unique index allows one *active* (queued/running) job per
(repo, file, revision); a second submit of the same pull returns that job.
Every call is a short transaction; the store is used from the event loop thread only.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from backend.models.errors import JobNotFound
from core.private_files import private_sqlite


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.RUNNING)
_ALLOWED_FROM: dict[JobState, tuple[JobState, ...]] = {
    JobState.RUNNING: (JobState.QUEUED,),
    JobState.QUEUED: (JobState.RUNNING,),
    JobState.DONE: (JobState.RUNNING,),
    JobState.FAILED: (JobState.QUEUED, JobState.RUNNING),
    JobState.CANCELLED: (JobState.QUEUED, JobState.RUNNING),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    file TEXT NOT NULL,
    revision TEXT NOT NULL,
    state TEXT NOT NULL,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    rate REAL,
    eta REAL,
    error TEXT,
    error_code TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    paths TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active
    ON jobs(repo, file, revision) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs(created);
"""


@dataclass(frozen=True)
class Job:
    id: str
    repo: str
    file: str  # as submitted: a file name or a glob pattern
    revision: str
    state: JobState
    bytes_done: int
    bytes_total: int | None
    rate: float | None  # bytes/s
    eta: float | None  # seconds
    error: str | None
    error_code: str | None
    files: tuple[str, ...]  # repo files it resolved to
    paths: tuple[str, ...]  # where they landed
    created: float  # unix time
    updated: float

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(state=self.state.value, files=list(self.files), paths=list(self.paths))
        return data


class JobStore:
    def __init__(self, db_path: Path, *, clock: Callable[[], float]) -> None:
        private_sqlite(db_path)  # 0600, and so its -wal and -shm files
        self._clock = clock
        # Autocommit; each statement below is its own transaction.
        self._db = sqlite3.connect(db_path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def submit(self, repo: str, file: str, revision: str) -> tuple[Job, bool]:
        """Create a queued job, or return the active one for the same pull; (job, created)."""
        now = self._clock()
        job_id = secrets.token_hex(8)
        try:
            self._db.execute(
                "INSERT INTO jobs (id, repo, file, revision, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, repo, file, revision, JobState.QUEUED.value, now, now),
            )
        except sqlite3.IntegrityError:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE repo = ? AND file = ? AND revision = ?"
                " AND state IN ('queued', 'running')",
                (repo, file, revision),
            ).fetchone()
            if row is None:  # it finished between the two statements: try once more
                return self.submit(repo, file, revision)
            return _job(row), False
        return self.get(job_id), True

    def get(self, job_id: str) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    def recent(self, limit: int = 100) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC, id LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def active(self) -> list[Job]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created, id"
        ).fetchall()
        return [_job(r) for r in rows]

    def transition(self, job_id: str, state: JobState, **fields: Any) -> Job | None:
        """Move to ``state`` if the job is in a state that allows it; None if it was not."""
        sources = _ALLOWED_FROM[state]
        assignments, values = _assignments({"state": state.value, **fields}, self._clock())
        cursor = self._db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND state IN ({', '.join('?' for _ in sources)})",
            (*values, job_id, *(s.value for s in sources)),
        )
        return self.get(job_id) if cursor.rowcount else None

    def progress(self, job_id: str, **fields: Any) -> None:
        """Update counters of a running job; ignored once the job left ``running``."""
        assignments, values = _assignments(fields, self._clock())
        self._db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND state = 'running'",
            (*values, job_id),
        )


_COLUMNS = frozenset(
    ("state", "bytes_done", "bytes_total", "rate", "eta", "error", "error_code", "files", "paths")
)


def _assignments(fields: dict[str, Any], now: float) -> tuple[str, list[Any]]:
    unknown = set(fields) - _COLUMNS
    if unknown:
        raise ValueError(f"not job columns: {sorted(unknown)}")  # a programming error
    values = [json.dumps(list(v)) if k in ("files", "paths") else v for k, v in fields.items()]
    # Column names come from the fixed set above, never from input.
    return ", ".join([*(f"{k} = ?" for k in fields), "updated = ?"]), [*values, now]


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        repo=row["repo"],
        file=row["file"],
        revision=row["revision"],
        state=JobState(row["state"]),
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        rate=row["rate"],
        eta=row["eta"],
        error=row["error"],
        error_code=row["error_code"],
        files=tuple(_strings(json.loads(row["files"]))),
        paths=tuple(_strings(json.loads(row["paths"]))),
        created=row["created"],
        updated=row["updated"],
    )


def _strings(value: object) -> Iterable[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
