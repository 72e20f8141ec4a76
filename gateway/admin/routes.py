"""Admin endpoints (the `admin` scope, checked by gateway/policy/auth.py before these run).

    POST /admin/keys/reload              re-read the keys file (or the fleet's key set) now
    GET  /admin/keys                     the keys, without secrets or hashes
    GET  /admin/usage?key=&since=&until= usage rows per key, model and hour

In a fleet, usage is read from Redis: while it is unreachable, /admin/usage answers 503 with
Retry-After (a reload says so in its own answer; the key list is read from memory).

Every call is appended to the audit log with the acting key's id: the SQLite ``Auditor``
on one machine, keys/audit_redis.py's ``RedisAuditor`` (same surface) in a fleet. Handlers
are built by ``install()`` around the objects they use, so they need nothing from the app
state.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Final

# fleet.link is loaded by every gateway already (gateway/policy/fleet_limits.py, via state.py)
from fleet.link import FleetDown
from gateway.edge.call import Call
from gateway.errors import BackendUnavailable, BadRequest
from gateway.router import Router, query_of, reply_json
from keys.audit import AuditLog
from keys.db import open_db
from keys.durations import parse_instant
from keys.errors import KeysError
from keys.model import SCOPE_ADMIN, ApiKey
from keys.reloader import KeyReloader, ReloadResult
from keys.usage_recorder import UsageRecorder

if TYPE_CHECKING:  # a fleet's (REDIS_URL): redis is imported only where there is one
    from keys.audit_redis import RedisAuditor
    from keys.usage_redis import RedisUsage
    from keys.watch_redis import RedisKeyWatcher


class Auditor:
    """The gateway's connection to the audit log; writes run in a worker thread."""

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time) -> None:
        self._db_path = db_path
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._opened = False
        self._lock = threading.Lock()  # one statement at a time on the shared connection

    async def open(self) -> None:
        self._opened = True
        # A database that cannot be opened now (read-only, full disk) is opened at the first
        # record instead: the gateway starts and serves meanwhile (issue 22).
        with contextlib.suppress(sqlite3.Error, OSError):
            await asyncio.to_thread(self._locked, self._connect)

    async def close(self) -> None:
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(self._locked, conn.close)

    async def record(self, actor: str, action: str, target: str | None = None,
                     detail: Mapping[str, object] | None = None) -> None:
        if not self._opened:
            raise RuntimeError("Auditor.open() has not been called")
        ts = self._clock()

        def write() -> None:
            conn = self._connect()
            try:
                AuditLog(conn).record_audit(ts=ts, actor=actor, action=action, target=target,
                                            detail=detail)
            except sqlite3.Error:
                # SQLite keeps a file it opened read-only so: the next record opens it anew
                self._conn = None
                conn.close()
                raise
        await asyncio.to_thread(self._locked, write)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_db(self._db_path, any_thread=True)
        return self._conn

    def _locked(self, call: Callable[[], object]) -> None:
        with self._lock:
            call()


def describe_key(key: ApiKey) -> dict[str, object]:
    """What an admin may see of a key: everything but its secret hashes."""
    return {
        "id": key.id, "name": key.name, "prefix": key.prefix, "scopes": sorted(key.scopes),
        "created": key.created, "expires": key.expires, "disabled": key.disabled,
        "limits": asdict(key.limits),
        "models": None if key.models is None else sorted(key.models),
        "previous_secrets_valid_until": [p.valid_until for p in key.previous],
    }


_LATEST: Final = 253402300799.0  # 9999-12-31T23:59:59Z in unix seconds
USAGE_UNREACHABLE: Final = "usage cannot be read: the fleet's Redis is unreachable"


def _instant(query: Mapping[str, str], name: str) -> float | None:
    raw = query.get(name, "").strip()
    if not raw:
        return None
    with contextlib.suppress(ValueError):
        seconds = float(raw)
        # within what SQLite's integers hold (a since=1e30 was a 500: OverflowError)
        if math.isfinite(seconds) and abs(seconds) <= _LATEST:
            return seconds
    try:
        return parse_instant(raw, time.time(), future=False)
    except KeysError:
        raise BadRequest(f"'{name}' must be unix seconds, a duration like 24h, or an ISO date",
                         param=name) from None


def actor_of(call: Call) -> str:
    key: ApiKey | None = call.key
    return "-" if key is None else key.id


def install(router: Router, keys: KeyReloader | RedisKeyWatcher,
            usage: UsageRecorder | RedisUsage, audit: Auditor | RedisAuditor) -> None:
    async def reload(call: Call) -> None:
        outcome = keys.reload()  # the fleet's watcher reads Redis: a coroutine
        result = outcome if isinstance(outcome, ReloadResult) else await outcome
        await audit.record(actor_of(call), "reload", None, {
            "ok": result.ok, "keys": result.key_count, "file_missing": result.file_missing})
        body = {"ok": result.ok, "keys": result.key_count, "error": result.error,
                "file_missing": result.file_missing}
        if not result.ok and keys.report().get("redis") == "unreachable":
            # the fleet's key set cannot be read now: the last good one stays; try again later
            raise BackendUnavailable(f"the key set cannot be reloaded: {result.error}",
                                     code="fleet_unavailable", retry_after=2)
        # A bad file keeps the last good keys: report it as a server-side failure.
        reply_json(call, body, status=200 if result.ok else 500)

    async def list_keys(call: Call) -> None:
        await audit.record(actor_of(call), "list_keys")
        reply_json(call, {"object": "list", "data": [describe_key(k) for k in keys.keyring]})

    async def read_usage(call: Call) -> None:
        query = query_of(call)
        key_id = query.get("key") or None
        since, until = _instant(query, "since"), _instant(query, "until")
        await audit.record(actor_of(call), "read_usage", key_id, {"since": since, "until": until})
        try:
            await usage.flush()  # so the answer includes requests finished a moment ago
            rows = await usage.usage(key_id, since, until)
        except FleetDown:  # a fleet's usage is in Redis: a wait, not a fault of the gateway's
            raise BackendUnavailable(USAGE_UNREACHABLE, code="fleet_unavailable",
                                     retry_after=2) from None
        reply_json(call, {"object": "list", "data": [asdict(r) for r in rows]})

    router.add(["POST"], "/admin/keys/reload", reload, SCOPE_ADMIN)
    router.add(["GET"], "/admin/keys", list_keys, SCOPE_ADMIN)
    router.add(["GET"], "/admin/usage", read_usage, SCOPE_ADMIN)
