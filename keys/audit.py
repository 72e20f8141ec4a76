"""Append-only audit log of key changes (who did what to which key, and when).

Details hold names, scopes and times, never secrets or hashes. Triggers in the schema refuse
UPDATE and DELETE so the log cannot be edited through this database connection.
"""

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

CLI_ACTOR: Final = "cli"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit record; ``actor`` is a key id or ``"cli"``. ``id``: the row's number in
    SQLite, the entry's stream id ("1700000000000-0") in the fleet's Redis."""

    id: int | str
    ts: float
    actor: str
    action: str
    target: str | None
    detail: dict[str, object]


class AuditLog:
    """Audit records in the usage database. Synchronous: call it from a thread in async code."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def record_audit(
        self,
        *,
        ts: float,
        actor: str,
        action: str,
        target: str | None,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        """Append one entry and commit it."""
        with self._conn:
            self._conn.execute(
                "INSERT INTO audit_log (ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                (ts, actor, action, target, json.dumps(dict(detail or {}), sort_keys=True)),
            )

    def list_audit(
        self,
        *,
        target: str | None = None,
        actor: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Return the newest ``limit`` matching entries, oldest first."""
        where, params = _filters(target=target, actor=actor, since=since)
        rows = self._conn.execute(
            f"SELECT id, ts, actor, action, target, detail FROM audit_log{where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry, oldest first (what ``llamagate keys migrate`` copies)."""
        for row in self._conn.execute(
                "SELECT id, ts, actor, action, target, detail FROM audit_log ORDER BY id"):
            yield _entry(row)


def _entry(r: tuple[int, float, str, str, str | None, str]) -> AuditEntry:
    return AuditEntry(id=r[0], ts=r[1], actor=r[2], action=r[3], target=r[4], detail=json.loads(r[5]))


def _filters(*, target: str | None, actor: str | None, since: float | None) -> tuple[str, tuple[object, ...]]:
    clauses: list[str] = []
    params: list[object] = []
    for clause, value in (("target = ?", target), ("actor = ?", actor), ("ts >= ?", since)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)
