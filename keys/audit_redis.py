"""The fleet's audit log: one Redis stream, ``<prefix>{audit}`` (keys/audit.py's twin).

Each entry has the fields ts (unix seconds, the recorder's clock), actor, action, target
(absent when there is none) and detail (JSON of names, scopes and times: callers never put a
secret or hash in it). XADD trims with ``MAXLEN ~ REDIS_AUDIT_MAX_ENTRIES``: Redis then drops
whole nodes of the stream, so it keeps at least that many entries and a few more, at a
fraction of the cost of an exact trim.

A listing reads the stream newest first in pages and filters on the entries' own fields. With
``since`` it stops at entries whose stream id (Redis's clock at the XADD) is well before it:
an entry's ts is taken just before its XADD, so it is never later than its id by more than the
clocks' skew. Entries copied by ``llamagate keys migrate`` keep their original ts; the set
``<prefix>{audit}:migrated`` remembers which SQLite rows were copied, written in one script
with the XADD so that a copy that is cut short can simply run again.

The gateway records through ``RedisAuditor`` (async, over the ``FleetLink``): an entry that
cannot be written because Redis is unreachable waits in a small queue, written in order when
the link hears Redis again, each entry once (a token per entry, remembered for a day). The
CLI uses ``RedisAuditSync``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from fleet.link import FleetDown, FleetLink
from keys.audit import AuditEntry
from keys.link_sync import SyncLink

PAGE = 500  # entries per XREVRANGE
SKEW = 300.0  # seconds of clock difference between replicas a `since` listing allows for
QUEUE_SIZE = 1000  # entries kept while Redis is unreachable; beyond, the oldest are dropped
MIGRATE_BATCH = 500

SENT_TTL = 86400  # seconds a written entry's token is remembered (see RECORD)

# Write one entry once. A write whose answer was lost (Redis paused past the timeout) may
# still be carried out when Redis resumes, and the queue then sends the entry again: the
# entry's token, set with NX, makes the second XADD a no-op.
RECORD = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
return 1
"""

# Copy one SQLite row once: SADD tells whether it was copied before, in the same step.
MIGRATE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return 1
"""


def stream_of(link: FleetLink | SyncLink) -> str:
    return link.name("audit")


def migrated_of(link: FleetLink | SyncLink) -> str:
    return link.name("audit", "migrated")


def fields_of(ts: float, actor: str, action: str, target: str | None,
              detail: Mapping[str, object] | None) -> list[str]:
    """An entry's stream fields, flat (name, value, name, value...)."""
    fields = ["ts", repr(float(ts)), "actor", actor, "action", action]
    if target is not None:
        fields += ["target", target]
    return [*fields, "detail", json.dumps(dict(detail or {}), sort_keys=True)]


def entry_of(entry_id: bytes | str, raw: Mapping[Any, Any] | None) -> AuditEntry:
    """Read one stream entry; a field written by hand that does not parse is shown as found."""
    f = {_text(k): _text(v) for k, v in (raw or {}).items()}
    sid = _text(entry_id)
    try:
        ts = float(f.get("ts", ""))
    except ValueError:
        ts = stream_seconds(sid)
    try:
        detail = json.loads(f.get("detail", "{}"))
    except ValueError:
        detail = {"unreadable": f.get("detail")}
    return AuditEntry(id=sid, ts=ts, actor=f.get("actor", "?"), action=f.get("action", "?"),
                      target=f.get("target"), detail=detail if isinstance(detail, dict) else {})


def stream_seconds(entry_id: str) -> float:
    """When Redis added the entry, from its id ("<ms>-<seq>")."""
    return int(entry_id.partition("-")[0]) / 1000


def migration_member(entry: AuditEntry) -> str:
    """How the migrated set names a SQLite row: its number and a digest of its content, so
    that row 7 of another machine's database is not taken for this one's."""
    content = json.dumps([entry.ts, entry.actor, entry.action, entry.target, entry.detail],
                         sort_keys=True)
    return f"{entry.id}:{hashlib.sha256(content.encode()).hexdigest()[:16]}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Scan:
    """One listing, fed page after page of XREVRANGE (newest first)."""

    target: str | None = None
    actor: str | None = None
    since: float | None = None
    limit: int = 100
    upper: str = "+"  # where the next page starts
    done: bool = False
    found: builtins.list[AuditEntry] = field(default_factory=builtins.list)

    def feed(self, page: Sequence[tuple[Any, Any]] | None) -> None:
        page = page or []
        for entry_id, raw in page:
            sid = _text(entry_id)
            if self.since is not None and stream_seconds(sid) < self.since - SKEW:
                self.done = True
                return
            entry = entry_of(sid, raw)
            if self._matches(entry):
                self.found.append(entry)
                if len(self.found) >= self.limit:
                    self.done = True
                    return
            self.upper = f"({sid}"
        self.done = self.done or len(page) < PAGE

    def _matches(self, e: AuditEntry) -> bool:
        return ((self.target is None or e.target == self.target)
                and (self.actor is None or e.actor == self.actor)
                and (self.since is None or e.ts >= self.since))

    def result(self) -> builtins.list[AuditEntry]:
        """The newest ``limit`` matches, oldest first (as ``AuditLog.list_audit``)."""
        return builtins.list(reversed(self.found))


class RedisAuditor:
    """The gateway's audit log in the fleet's stream, with the SQLite ``Auditor``'s surface
    (gateway/admin/routes.py). ``await open()`` before recording, ``await close()`` at
    shutdown (it writes what waits, if Redis answers)."""

    def __init__(self, link: FleetLink, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.time, *, queue_size: int = QUEUE_SIZE,
                 logger: logging.Logger | None = None) -> None:
        self._link = link
        self._stream = stream_of(link)
        self._max = max_entries
        self._clock = clock
        self._record = link.script(RECORD)
        self._queue: collections.deque[tuple[str, builtins.list[str]]] = collections.deque()
        self._queue_size = queue_size
        self._dropped = 0  # entries lost to a full queue in this outage
        self._log = logger or logging.getLogger("llamagate.audit")
        self._flusher: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Entries waiting for Redis."""
        return len(self._queue)

    async def open(self) -> None:
        self._link.on_up.append(self._on_up)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._link.on_up.remove(self._on_up)
        if self._flusher is not None:
            await self._flusher
        if self._queue and self._link.up:
            await self._flush()
        if self._queue:
            self._log.error("%d audit entries were never written: Redis at %s is unreachable",
                            len(self._queue), self._link.where)

    async def record(self, actor: str, action: str, target: str | None = None,
                     detail: Mapping[str, object] | None = None) -> None:
        """Append one entry, stamped now; with Redis unreachable it waits in the queue."""
        entry = (secrets.token_hex(8), fields_of(self._clock(), actor, action, target, detail))
        if not self._queue:
            try:
                await self._add(entry)
                return
            except (FleetDown, RedisError):  # unreachable, or refusing writes (READONLY, OOM)
                pass
        self._keep(entry)
        if self._link.up:  # back already (or a write failed while it said up): try now
            self._on_up()

    async def list(self, *, target: str | None = None, actor: str | None = None,
                   since: float | None = None, limit: int = 100) -> builtins.list[AuditEntry]:
        """The newest ``limit`` matching entries, oldest first."""
        scan = Scan(target, actor, since, limit)
        while not scan.done:
            scan.feed(await self._link.command("XREVRANGE", self._stream, scan.upper, "-",
                                               "COUNT", PAGE))
        return scan.result()

    async def _add(self, entry: tuple[str, Sequence[str]]) -> None:
        token, fields = entry
        await self._link.run(self._record, [self._stream, self._link.name("audit", f"sent:{token}")],
                             [self._max, SENT_TTL, *fields])

    def _keep(self, entry: tuple[str, builtins.list[str]]) -> None:
        if len(self._queue) >= self._queue_size:
            self._queue.popleft()
            if self._dropped == 0:
                self._log.error("audit queue full (%d entries) while Redis is unreachable: "
                                "dropping the oldest", self._queue_size)
            self._dropped += 1
        self._queue.append(entry)

    def _on_up(self) -> None:
        if self._queue and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush(),
                                                                   name="audit-flush")

    async def _flush(self) -> None:
        written = 0
        while self._queue:
            try:
                await self._add(self._queue[0])
            except (FleetDown, RedisError):
                return  # down again: the next on_up goes on
            self._queue.popleft()
            written += 1
        self._log.warning("wrote %d audit entries kept while Redis was unreachable%s", written,
                          f" ({self._dropped} dropped: the queue was full)" if self._dropped else "")
        self._dropped = 0


class RedisAuditSync:
    """The audit stream for the CLI, with ``AuditLog``'s methods."""

    def __init__(self, link: SyncLink, max_entries: int = 100_000) -> None:
        self._client = link.client
        self._stream = stream_of(link)
        self._migrated = migrated_of(link)
        self._max = max_entries
        self._migrate = link.client.register_script(MIGRATE)

    def record_audit(self, *, ts: float, actor: str, action: str, target: str | None,
                     detail: Mapping[str, object] | None = None) -> None:
        flat = fields_of(ts, actor, action, target, detail)
        self._client.xadd(self._stream, dict(zip(flat[::2], flat[1::2], strict=True)),
                          maxlen=self._max, approximate=True)

    def list_audit(self, *, target: str | None = None, actor: str | None = None,
                   since: float | None = None, limit: int = 100) -> builtins.list[AuditEntry]:
        scan = Scan(target, actor, since, limit)
        while not scan.done:
            scan.feed(self._client.xrevrange(self._stream, scan.upper, "-", count=PAGE))
        return scan.result()

    def migrate(self, entries: Iterable[AuditEntry]) -> tuple[int, int]:
        """Copy SQLite audit rows, each once: (copied, copied before)."""
        copied = seen = 0
        rows = iter(entries)
        while batch := builtins.list(itertools.islice(rows, MIGRATE_BATCH)):
            pipe = self._client.pipeline(transaction=False)
            for e in batch:
                self._migrate(keys=[self._stream, self._migrated], client=pipe,
                              args=[migration_member(e), self._max,
                                    *fields_of(e.ts, e.actor, e.action, e.target, e.detail)])
            done = pipe.execute()
            copied += done.count(1)
            seen += done.count(0)
        return copied, seen
