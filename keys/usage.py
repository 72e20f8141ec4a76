"""Token usage per key, per model, per hour: the pure aggregation and the SQLite table.

Hours are UTC buckets identified by their start (unix seconds, a multiple of 3600).
"""

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

HOUR: Final = 3600


class UsageEvent(NamedTuple):
    """One finished request, as recorded on the request path (a NamedTuple: cheap to build)."""

    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    ts: float


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals for one key and model within one hour."""

    key_id: str
    model: str
    hour: int
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """Events folded into per-hour increments plus each key's latest timestamp."""

    rows: tuple[UsageRow, ...]
    last_used: dict[str, float]


def hour_bucket(ts: float) -> int:
    """Start of the UTC hour containing ``ts``."""
    return int(ts // HOUR) * HOUR


class Tally:
    """Per (key, model, hour) increments and each key's latest request time, folded as
    events come: recording a request costs a dict update, and a flush writes a few rows."""

    __slots__ = ("events", "last_used", "totals")

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str, int], list[int]] = {}
        self.last_used: dict[str, float] = {}
        self.events = 0

    def __len__(self) -> int:
        return len(self.totals)

    def add(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int,
            ts: float) -> None:
        where = (key_id, model, int(ts // HOUR) * HOUR)
        t = self.totals.get(where)
        if t is None:
            t = self.totals[where] = [0, 0, 0]
        t[0] += 1
        t[1] += prompt_tokens
        t[2] += completion_tokens
        if ts > self.last_used.get(key_id, float("-inf")):
            self.last_used[key_id] = ts
        self.events += 1

    def seen(self, key_id: str, ts: float) -> None:
        """A request of the key that used no tokens (admin, metrics, listings): its last use."""
        if ts > self.last_used.get(key_id, float("-inf")):
            self.last_used[key_id] = ts

    def merge(self, other: "Tally") -> None:
        """Add ``other``'s counts to these (a batch that could not be written)."""
        for where, counts in other.totals.items():
            t = self.totals.setdefault(where, [0, 0, 0])
            for i, n in enumerate(counts):
                t[i] += n
        for k, ts in other.last_used.items():
            if ts > self.last_used.get(k, float("-inf")):
                self.last_used[k] = ts
        self.events += other.events

    def batch(self) -> "UsageBatch":
        rows = tuple(UsageRow(k, m, h, t[0], t[1], t[2]) for (k, m, h), t in self.totals.items())
        return UsageBatch(rows=rows, last_used=dict(self.last_used))


def aggregate(events: Iterable[UsageEvent]) -> UsageBatch:
    """Fold events into one increment per (key, model, hour)."""
    tally = Tally()
    for e in events:
        tally.add(e.key_id, e.model, e.prompt_tokens, e.completion_tokens, e.ts)
    return tally.batch()


class UsageStore:
    """The usage tables. Synchronous: async code calls it through ``UsageRecorder``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def write(self, batch: UsageBatch, token: str | None = None,
              spools: Sequence[tuple[str, UsageBatch]] = (), now: float = 0.0) -> list[str]:
        """Add a batch to the counters in one transaction, with the spools of processes that
        are gone. ``token``: the writer's own spool on disk, whose rows ``batch`` includes;
        recorded so that, were the writer to die before deleting the file, no one counts it
        again. ``spools``: (token, batch) of spools of processes that are gone; one whose token
        is already recorded is skipped. Returns the tokens of the spools added."""
        added: list[str] = []
        with self._conn:
            # The first statement writes, so the transaction holds the write lock from here:
            # two processes recovering one spool are serialised, and the second skips it.
            if token is not None:
                self._mark(token, now)
            for spool_token, spooled in spools:
                if self._mark(spool_token, now):
                    self._add(spooled)
                    added.append(spool_token)
            self._add(batch)
        return added

    def probe(self) -> None:
        """Raise as a write would on a database this connection cannot write: a statement
        that writes nothing still takes the write lock, which a read-only file refuses."""
        with self._conn:
            self._conn.execute("DELETE FROM usage_spools_applied WHERE 0")

    def _mark(self, token: str, now: float) -> bool:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO usage_spools_applied (token, ts) VALUES (?, ?)", (token, now))
        return cur.rowcount == 1

    def _add(self, batch: UsageBatch) -> None:
        self._conn.executemany(
            "INSERT INTO usage_hourly (key_id, model, hour, requests, prompt_tokens,"
            " completion_tokens) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (key_id, model, hour) DO UPDATE SET"
            " requests = requests + excluded.requests,"
            " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens",
            [
                (r.key_id, r.model, r.hour, r.requests, r.prompt_tokens, r.completion_tokens)
                for r in batch.rows
            ],
        )
        self._conn.executemany(
            "INSERT INTO key_last_used (key_id, ts) VALUES (?, ?)"
            " ON CONFLICT (key_id) DO UPDATE SET ts = max(ts, excluded.ts)",
            list(batch.last_used.items()),
        )

    def usage(
        self, key_id: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[UsageRow]:
        """Rows for hours overlapping ``[since, until)``, oldest hour first.

        The hour containing ``since`` is included, as hours are the finest grain stored.
        """
        clauses: list[str] = []
        params: list[object] = []
        if key_id is not None:
            clauses.append("key_id = ?")
            params.append(key_id)
        if since is not None:
            clauses.append("hour >= ?")
            params.append(hour_bucket(since))
        if until is not None:
            clauses.append("hour < ?")
            params.append(until)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        rows = self._conn.execute(
            "SELECT key_id, model, hour, requests, prompt_tokens, completion_tokens"
            f" FROM usage_hourly{where} ORDER BY hour, key_id, model",
            params,
        ).fetchall()
        return [UsageRow(*r) for r in rows]

    def last_used(self, key_id: str) -> float | None:
        """Time of the key's latest recorded request, or None if it was never used."""
        row = self._conn.execute("SELECT ts FROM key_last_used WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else float(row[0])

    def last_used_all(self) -> dict[str, float]:
        """Latest request time of every key that has one."""
        rows = self._conn.execute("SELECT key_id, ts FROM key_last_used")
        return {key_id: float(ts) for key_id, ts in rows}
