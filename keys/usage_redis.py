"""Usage counted in the fleet's Redis (REDIS_URL): the interface of ``UsageRecorder``, so the
gateway holds either, with every replica adding to one set of counters (issue 23).

Layout, all of one API key under its hash tag (``FleetLink.of_key``), so each script touches
one slot:

    usage:<YYYYMMDD>   hash per UTC day: "<hour>|<model>|r|p|c" -> requests, prompt, completion
    usage:days         zset of those days (score: unix day), trimmed past the retention
    usage:last         the key's latest request time
    usage:applied      hash replica -> last batch sequence applied (exactly once, below)
    usage:appliers     zset replica -> server time of its last apply (bounds ``applied``)
    usage:migrated     hash of what ``import_rows`` added, per field (reruns add the difference)

and fleet-wide ``{usage}:keys``, the keys that have usage, for readers of the fleet's totals.
A day's hash expires ``retention_days`` + 1 days after the day began (EXPIREAT, not a TTL from
the write: an old buffer replayed late does not keep a day past the retention), and usage of
a day already past it is not written. Readers raise ``FleetDown`` while Redis is unreachable.

Exactly once: ``record()`` folds into a tally in memory; every ``flush_interval`` the tally is
cut into one batch per key, all numbered with the next sequence of this replica, and each is
applied by a script that skips a (replica, seq) not above the one it last applied. A batch
whose answer was lost (Redis applied it, then the timeout fired) is resent unchanged and
counted once. A batch once sent is never merged with anything, and the batches of one replica
and key are sent oldest first: a newer one applied first would make the older look applied.
Events recorded while Redis is down fold into one tally that was never sent (safe to merge).

Outage: the batches waiting and that tally are kept in a buffer file (one per process, JSON,
0600, atomic replace) in ``buffer_dir``, rewritten as they change. The flusher does not try
Redis while the link says it is down; the link's probe wakes it when Redis answers, and the
buffer is replayed. At ``open()``, buffer files of processes that are gone (pid, boot and
start time, as usage spools are judged) are replayed under their own replica and sequences,
so two replicas taking one file count it once. Redis forgets a replica seven days after its
last apply, so a batch first sent more than six days ago (a day of margin for clocks) is not
replayed: it could count twice. It is logged and kept in a ``stale-*`` file for an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from redis.exceptions import RedisError

from core.private_files import FILE_MODE, private_dir
from fleet.link import FleetDown, FleetLink
from keys.usage import HOUR, Tally, UsageRow, hour_bucket
from keys.usage_spool import process_identity, writer_alive

DAY: Final = 86_400
KEEP_APPLIERS: Final = 7 * DAY  # Redis remembers a replica's last seq this long after its last apply
REPLAY_WITHIN: Final = 6 * DAY  # a batch first sent longer ago might count twice: not replayed
PREFIX: Final = "redis-usage-"  # not "usage-": the spools' prefix, in a directory they may share
_VERSION: Final = 1
_CHUNK: Final = 256  # script calls per pipeline when reading: one pipeline must beat the timeout

# One key's batch. KEYS: applied, appliers, days, last, then one day hash per day of ARGV.
# ARGV: replica, seq, last ('' none), retention days, seconds appliers are kept, then per day:
# unix day, day name, n, and n (field, increment) pairs.
APPLY: Final = """
local seq = tonumber(ARGV[2])
if seq <= tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') then return 0 end
local now = tonumber(redis.call('TIME')[1])
local keep = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - keep)) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
if ARGV[3] ~= '' then
  local old = redis.call('GET', KEYS[4])
  if not old or tonumber(old) < tonumber(ARGV[3]) then redis.call('SET', KEYS[4], ARGV[3]) end
end
local retention = tonumber(ARGV[4])
local first = math.floor(now / 86400) - retention + 1
local i = 6
for k = 5, #KEYS do
  local day, n = tonumber(ARGV[i]), tonumber(ARGV[i + 2])
  if day >= first then
    for j = i + 3, i + 1 + 2 * n, 2 do redis.call('HINCRBY', KEYS[k], ARGV[j], ARGV[j + 1]) end
    redis.call('EXPIREAT', KEYS[k], (day + retention + 1) * 86400)
    redis.call('ZADD', KEYS[3], day, ARGV[i + 1])
  end
  i = i + 3 + 2 * n
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', first - 1)
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], (retention + 1) * 86400) end
return 1
"""

# SQLite rows added once: KEYS: migrated, days, last, then the day hash of each row. ARGV: last
# ('' none), retention days, then per row: unix day, day name, "<hour>|<model>", r, p, c.
IMPORT: Final = """
local now = tonumber(redis.call('TIME')[1])
local retention = tonumber(ARGV[2])
local first = math.floor(now / 86400) - retention + 1
local changed, same, i = 0, 0, 3
for k = 4, #KEYS do
  local day = tonumber(ARGV[i])
  if day >= first then
    local moved = false
    for s, kind in ipairs({'|r', '|p', '|c'}) do
      local field = ARGV[i + 2] .. kind
      local diff = tonumber(ARGV[i + 2 + s]) - tonumber(redis.call('HGET', KEYS[1], field) or '0')
      if diff > 0 then
        redis.call('HINCRBY', KEYS[k], field, diff)
        redis.call('HINCRBY', KEYS[1], field, diff)
        moved = true
      end
    end
    if moved then
      changed = changed + 1
      redis.call('EXPIREAT', KEYS[k], (day + retention + 1) * 86400)
      redis.call('ZADD', KEYS[2], day, ARGV[i + 1])
    else
      same = same + 1
    end
  end
  i = i + 6
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', first - 1)
redis.call('EXPIRE', KEYS[1], (retention + 1) * 86400)
if ARGV[1] ~= '' then
  local old = redis.call('GET', KEYS[3])
  if not old or tonumber(old) < tonumber(ARGV[1]) then redis.call('SET', KEYS[3], ARGV[1]) end
end
return {changed, same}
"""

_SADD: Final = "for _, k in ipairs(ARGV) do redis.call('SADD', KEYS[1], k) end return 1"
# Reads go as scripts too: the link sends one loop turn's scripts in one pipeline.
_RANGE: Final = "return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[2])"
_HGETALL: Final = "return redis.call('HGETALL', KEYS[1])"
_GET: Final = "return redis.call('GET', KEYS[1])"

Observer = Callable[[int, bool], None]  # (events pending, whether this flush failed), as UsageRecorder's
Row = tuple[str, int, int, int, int]  # model, hour, requests, prompt tokens, completion tokens


@dataclass(eq=False, slots=True)
class _Batch:
    """One key's share of one flush, as numbered when first cut: resent only as it is."""

    replica: str
    seq: int
    key_id: str
    rows: tuple[Row, ...]
    last: float | None
    sent: float | None  # wall time of the first send; None: never sent, safe at any age

    @property
    def events(self) -> int:
        return sum(r[2] for r in self.rows)

    def encode(self) -> dict[str, Any]:
        return {"replica": self.replica, "seq": self.seq, "key": self.key_id,
                "rows": [list(r) for r in self.rows], "last": self.last, "sent": self.sent}


@dataclass(frozen=True, slots=True)
class _Taken:
    """A buffer file of a process that is gone, read at ``open()``."""

    path: Path
    pid: int
    batches: list[_Batch]


def _day_name(ts: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(ts))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cut(tally: Tally, replica: str, seq: int, blocked: set[str]) -> tuple[list[_Batch], Tally]:
    """One batch per key of ``tally``, numbered ``seq``; keys in ``blocked`` (an older batch of
    theirs still waits) stay in the tally returned, which was never sent."""
    rows: dict[str, list[Row]] = {}
    kept = Tally()
    for (key_id, model, hour), (r, p, c) in tally.totals.items():
        if key_id in blocked:
            kept.totals[(key_id, model, hour)] = [r, p, c]
            kept.events += r
        else:
            rows.setdefault(key_id, []).append((model, hour, r, p, c))
    batches = []
    for key_id in sorted(set(rows) | set(tally.last_used)):
        last = tally.last_used.get(key_id)
        if key_id in blocked:
            if last is not None:
                kept.last_used[key_id] = last
        else:
            batches.append(_Batch(replica, seq, key_id, tuple(rows.get(key_id, ())), last, None))
    return batches, kept


def _apply_call(link: FleetLink, b: _Batch, retention: int) -> tuple[list[str], list[Any]]:
    of = link.of_key
    keys = [of(b.key_id, "usage:applied"), of(b.key_id, "usage:appliers"),
            of(b.key_id, "usage:days"), of(b.key_id, "usage:last")]
    args: list[Any] = [b.replica, b.seq, "" if b.last is None else repr(b.last), retention,
                       KEEP_APPLIERS]
    days: dict[int, list[Row]] = {}
    for row in b.rows:
        days.setdefault(row[1] // DAY, []).append(row)
    for day, rows in sorted(days.items()):
        name = _day_name(day * DAY)
        keys.append(of(b.key_id, f"usage:{name}"))
        args += [day, name, 3 * len(rows)]
        for model, hour, r, p, c in rows:
            args += [f"{hour}|{model}|r", r, f"{hour}|{model}|p", p, f"{hour}|{model}|c", c]
    return keys, args


# the buffer file ---------------------------------------------------------------------------
def encode_buffer(fleet: str, replica: str, next_seq: int, held: Sequence[_Batch],
                  tally: Tally, *, final: bool) -> bytes:
    """A buffer file: the batches waiting, and the tally never sent, which a process taking
    the file sends as ``next_seq`` of ``replica`` (as this process would have)."""
    pid = os.getpid()
    return json.dumps({
        "version": _VERSION, "pid": pid, "identity": process_identity(pid), "fleet": fleet,
        "replica": replica, "next_seq": next_seq, "final": final, "written": time.time(),
        "batches": [b.encode() for b in held],
        "unsent": {"rows": [[k, m, h, *t] for (k, m, h), t in tally.totals.items()],
                   "last_used": tally.last_used},
    }).encode()


def _decode_batch(d: Mapping[str, Any]) -> _Batch:
    rows = tuple((str(m), int(h), int(r), int(p), int(c)) for m, h, r, p, c in d["rows"])
    last, sent = d["last"], d["sent"]
    return _Batch(str(d["replica"]), int(d["seq"]), str(d["key"]), rows,
                  None if last is None else float(last), None if sent is None else float(sent))


def _decode_buffer(data: Mapping[str, Any]) -> list[_Batch]:
    batches = [_decode_batch(d) for d in data["batches"]]
    unsent = Tally()
    for k, m, h, r, p, c in data["unsent"]["rows"]:
        unsent.totals[(str(k), str(m), int(h))] = [int(r), int(p), int(c)]
    unsent.last_used.update({str(k): float(ts) for k, ts in data["unsent"]["last_used"].items()})
    fresh, _ = cut(unsent, str(data["replica"]), int(data["next_seq"]), set())
    return batches + fresh


def write_file(directory: Path, name: str, body: bytes) -> None:
    """Replace ``directory/name`` atomically with a 0600 file. The directory must be ours and
    writable by us alone, in a parent no one else can swap it in: others could plant usage
    for us to replay."""
    private_dir(directory)
    st, up = os.lstat(directory), os.lstat(directory.parent)
    # under a shared /tmp, another user may have made a level first, to swap ours for theirs
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022 \
            or up.st_uid not in (0, os.getuid()) \
            or (up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX):
        raise PermissionError(f"usage buffer directory {directory} is not a private directory of ours")
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        f.write(body)
    os.replace(tmp, directory / name)


def orphans(directory: Path, own: str, fleet: str) -> tuple[list[_Taken], list[Path]]:
    """Buffer files of this fleet whose writers are gone (or closed for good), and the paths of
    files that cannot be read (left in place)."""
    taken: list[_Taken] = []
    bad: list[Path] = []
    try:
        paths = sorted(directory.glob(f"{PREFIX}*.json"))
    except OSError:
        return taken, bad
    for path in paths:
        if path.name == own:
            continue
        try:
            data = json.loads(path.read_bytes())
            if data["fleet"] != fleet:
                continue  # another Redis or prefix: its own gateway replays it
            pid, identity = int(data["pid"]), str(data["identity"])
            if data["final"] is not True and writer_alive(pid, identity):
                continue
            taken.append(_Taken(path, pid, _decode_buffer(data)))
        except FileNotFoundError:
            continue  # taken by another process meanwhile
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            bad.append(path)
    return taken, bad


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class RedisUsage:
    """This process's usage on its way to the fleet's counters: the tally, the batches waiting
    for Redis, the buffer file and the flusher task."""

    def __init__(self, link: FleetLink, *, flush_interval: float = 1.0, buffer_dir: Path,
                 retention_days: int = 400, max_rows: int = 100_000,
                 logger: logging.Logger | None = None) -> None:
        self._link = link
        self._interval = flush_interval
        self._dir = buffer_dir
        self._retention = retention_days
        self._max_rows = max_rows
        self._log = logger or logging.getLogger("llamagate.keys")
        self._apply = link.script(APPLY)
        self._sadd = link.script(_SADD)
        # the link's replica, and this recorder's: two recorders on one link (a test, a restart
        # of the app in one process) must not share sequence numbers
        self._replica = f"{link.replica}.{secrets.token_hex(2)}"
        self._fleet = f"{link.where} {link.prefix}"  # a file is replayed into its own fleet only
        self._name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json"
        self.observer: Observer | None = None
        self._tally = Tally()  # never sent: merged freely
        self._held: list[_Batch] = []  # numbered, not acknowledged; oldest first in each lane
        self._held_rows = 0
        self._held_events = 0
        self._next_seq = 1
        self._dropped = 0
        self._drop_logged = False
        self._failures = 0
        self._error: str | None = None  # why the latest flush failed; None while Redis takes usage
        self._failing_since: float | None = None
        self._replayed = 0  # buffered events sent since the failure began, for the log
        self._file: tuple[int, ...] | None = None  # what our buffer file holds; None: no file
        self._file_events = 0
        self._file_error: str | None = None
        self._taken: list[Path] = []  # files of processes that are gone, whose batches we hold
        self._opened = False
        self._closed = False
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # set by the link when Redis answers again
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Events recorded but not yet written to Redis."""
        return self._tally.events + self._held_events

    @property
    def buffered(self) -> int:
        """Events waiting on local disk (the buffer file) for Redis."""
        return self._file_events if self._file is not None else 0

    @property
    def dropped(self) -> int:
        """Events discarded because the buffer was full or the recorder closed."""
        return self._dropped

    @property
    def write_failures(self) -> int:
        """Flushes whose batches Redis did not take."""
        return self._failures

    @property
    def buffer_path(self) -> Path | None:
        """This process's buffer file while it holds events, else None."""
        return self._dir / self._name if self._file is not None else None

    def report(self) -> dict[str, object]:
        """The state for /health: whether usage reaches Redis, what waits, and why."""
        return {"ok": self._error is None, "pending": self.pending, "error": self._error,
                "failing_since": self._failing_since, "spooled": self._file is not None,
                "buffered": self.buffered, "dropped": self._dropped}

    async def open(self) -> None:
        """Take the buffer files of processes that are gone, and replay them if Redis answers
        (a Redis that does not is no error: the usage waits in our buffer file)."""
        self._opened = True
        if self._wake.set not in self._link.on_up:
            self._link.on_up.append(self._wake.set)
        taken, bad = await asyncio.to_thread(orphans, self._dir, self._name, self._fleet)
        for path in bad:
            self._log.error("usage buffer %s cannot be read; left in place", path)
        for t in taken:
            now = time.time()
            stale = [b for b in t.batches if b.sent is not None and now - b.sent > REPLAY_WITHIN]
            if stale:
                await self._set_aside(f"stale-{t.path.name}", stale)
            fresh = [b for b in t.batches if b not in stale]
            self._hold(fresh)
            self._taken.append(t.path)
            self._log.warning("replaying %d usage events buffered in %s by process %d, gone",
                              sum(b.events for b in fresh), t.path, t.pid)
        if taken:
            self._held.sort(key=lambda b: (b.replica, b.seq))
            await self._sync_file()  # ours holds their batches now, so their files can go
        if self._held and self._link.up:
            await self.flush()

    def start(self) -> None:
        """Start the flusher task; ``close()`` stops it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flusher")

    def record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, ts: float) -> None:
        """Note one finished request. Never blocks and never raises on the request path."""
        tally = self._tally
        if self._closed or (len(tally) + self._held_rows >= self._max_rows
                            and (key_id, model, int(ts // HOUR) * HOUR) not in tally.totals):
            self._dropped += 1
            return
        tally.add(key_id, model, prompt_tokens, completion_tokens, ts)

    def seen(self, key_id: str, ts: float) -> None:
        """Note a request of the key's: its last use, whether or not it used tokens."""
        if not self._closed:
            self._tally.seen(key_id, ts)

    async def flush(self) -> int:
        """Send the waiting batches, then what was recorded since; returns the number of this
        process's events Redis took. What it does not take stays buffered."""
        async with self._flush_lock:
            if not self._held and not self._tally.events and not self._tally.last_used:
                return 0
            if not self._opened:
                raise RuntimeError("RedisUsage.open() has not been called")
            self._log_drops()
            if not self._link.up:  # the probe wakes the flusher when it answers again
                await self._fail(f"Redis at {self._link.where} is unreachable", attempted=False)
                return 0
            await self._set_aside_stale()
            written, error, down = await self._send_held()
            if not down:
                more, later_error, down = await self._send_new()
                written, error = written + more, error or later_error
                self._replayed += more if self._error is not None else 0
            if error is not None:
                await self._fail(error, attempted=True)
                return written
            if self._error is not None:
                down_for = time.time() - (self._failing_since or time.time())
                self._log.warning("usage reaches Redis at %s again after %.1fs; %d buffered events "
                                  "replayed", self._link.where, down_for, self._replayed)
                self._drop_logged = False
            self._error, self._failing_since, self._replayed = None, None, 0
            if self._file is not None or self._taken:
                await self._sync_file()
            self._notify(False)
            return written

    async def close(self) -> None:
        """Stop the flusher and send what is left; with Redis down it stays in the buffer
        file, for the next process to start with this buffer directory."""
        self._closed = True
        with contextlib.suppress(ValueError):
            self._link.on_up.remove(self._wake.set)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                self._log.error("usage flusher had stopped: %r", task.exception())
        if not self._opened:
            return
        await self.flush()
        if self.pending or self._tally.last_used:
            await self._sync_file(final=True)
            kept = self.buffered
            if kept:
                self._log.warning("Redis at %s is unreachable: %d usage events kept in %s for the "
                                  "next start", self._link.where, kept, self.buffer_path)
            if self.pending > kept:
                self._log.error("dropping %d usage events that could not be sent or buffered",
                                self.pending - kept)
                self._dropped += self.pending - kept
        self._tally, self._held, self._held_rows, self._held_events = Tally(), [], 0, 0
        self._opened = False

    async def usage(self, key_id: str | None = None, since: float | None = None,
                    until: float | None = None) -> list[UsageRow]:
        """The fleet's usage rows (see ``read_usage``); call ``flush()`` first for fresh data."""
        return await read_usage(self._link, key_id, since, until)

    async def last_used(self, key_id: str) -> float | None:
        """Latest request time of a key, over the fleet."""
        return await read_last_used(self._link, key_id)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            # Shielded so a close() arriving mid-flush lets it finish (close waits on the lock).
            await asyncio.shield(self.flush())

    # sending -----------------------------------------------------------------------------
    async def _send(self, batches: list[_Batch]) -> tuple[list[bool], str | None, bool]:
        """Send ``batches`` in one pipeline: (which Redis took, the error if any, whether
        Redis is down)."""
        link, now = self._link, time.time()
        calls = []
        for b in batches:
            b.sent = b.sent or now
            calls.append(link.run_soon(self._apply, *_apply_call(link, b, self._retention)))
        # the fleet's key set has a slot of its own: a separate script in the same pipeline
        calls.append(link.run_soon(self._sadd, [link.name("usage", "keys")],
                                   sorted({b.key_id for b in batches})))
        results = await asyncio.gather(*calls, return_exceptions=True)
        error, down = None, False
        for r in results:
            if isinstance(r, FleetDown):
                error, down = f"Redis at {link.where} is unreachable: {r}", True
            elif isinstance(r, RedisError):
                error = error or f"{type(r).__name__}: {r}"
            elif isinstance(r, BaseException):
                raise r
        if isinstance(results[-1], BaseException):  # resent, they add the key again (and nothing else)
            return [False] * len(batches), error, down
        return [not isinstance(r, BaseException) for r in results[:-1]], error, down

    async def _send_held(self) -> tuple[int, str | None, bool]:
        """Resend the waiting batches, each lane (replica, key) oldest first: a newer batch
        applied first would make the older one look applied."""
        written, error, stuck = 0, None, set[tuple[str, str]]()
        while True:
            heads: dict[tuple[str, str], _Batch] = {}
            for b in self._held:
                heads.setdefault((b.replica, b.key_id), b)
            batches = [b for lane, b in heads.items() if lane not in stuck]
            if not batches:
                return written, error, False
            acked, err, down = await self._send(batches)
            done = [b for b, ok in zip(batches, acked, strict=True) if ok]
            stuck |= {(b.replica, b.key_id) for b, ok in zip(batches, acked, strict=True) if not ok}
            self._release(done)
            self._replayed += sum(b.events for b in done)
            written += sum(b.events for b in done if b.replica == self._replica)
            error = error or err
            if down:
                return written, error, True

    async def _send_new(self) -> tuple[int, str | None, bool]:
        """Number and send what was recorded since the last flush; a key with a batch still
        waiting keeps its events in the tally (never sent, so they may merge)."""
        blocked = {b.key_id for b in self._held if b.replica == self._replica}
        batches, self._tally = cut(self._tally, self._replica, self._next_seq, blocked)
        if not batches:
            return 0, None, False
        self._next_seq += 1
        self._hold(batches)
        acked, error, down = await self._send(batches)
        done = [b for b, ok in zip(batches, acked, strict=True) if ok]
        self._release(done)
        return sum(b.events for b in done), error, down

    def _hold(self, batches: list[_Batch]) -> None:
        self._held += batches
        self._held_rows += sum(len(b.rows) for b in batches)
        self._held_events += sum(b.events for b in batches)

    def _release(self, batches: list[_Batch]) -> None:
        gone = {id(b) for b in batches}
        self._held = [b for b in self._held if id(b) not in gone]
        self._held_rows -= sum(len(b.rows) for b in batches)
        self._held_events -= sum(b.events for b in batches)

    # failing and the buffer file ---------------------------------------------------------
    async def _fail(self, error: str, *, attempted: bool) -> None:
        """Redis did not take the usage: keep it in the buffer file, and say so once."""
        first = self._error is None
        self._failures += attempted
        self._error = error
        if first:
            self._failing_since = time.time()
        await self._sync_file()
        if first:
            self._log.error("usage cannot be written to Redis, %d events buffered in %s: %s",
                            self.pending, self._dir / self._name, error)
        self._notify(attempted)

    def _log_drops(self) -> None:
        if self._dropped and not self._drop_logged:  # once until Redis takes usage again
            self._drop_logged = True
            self._log.error("usage buffer full (%d rows): new usage is dropped until Redis takes "
                            "it, %d events so far", self._max_rows, self._dropped)

    async def _sync_file(self, *, final: bool = False) -> None:
        """Make the buffer file hold what waits for Redis, or remove it: while Redis takes
        usage, the unsent tally lives in memory only, as it does without Redis."""
        tally = self._tally
        keep_tally = (self._error is not None or final) and bool(tally.events or tally.last_used)
        if not self._held and not keep_tally:
            await asyncio.to_thread(self._remove_files, remove_own=True)
            self._file, self._file_events = None, 0
            return
        snapshot = (len(self._held), self._held_events, tally.events, len(tally.last_used),
                    self._next_seq)
        if snapshot == self._file and not final:
            return
        body = encode_buffer(self._fleet, self._replica, self._next_seq, self._held, tally,
                             final=final)  # on the loop: record() changes the tally
        try:
            await asyncio.to_thread(write_file, self._dir, self._name, body)
        except OSError as exc:
            if self._file_error is None:
                self._log.error("cannot buffer usage in %s, %d events held in memory only: %s",
                                self._dir, self.pending, exc)
            self._file_error = str(exc)
            return
        if self._file_error is not None:
            self._log.warning("usage buffered in %s again", self._dir)
        self._file_error = None
        self._file, self._file_events = snapshot, self._held_events + tally.events
        await asyncio.to_thread(self._remove_files, remove_own=False)

    def _remove_files(self, *, remove_own: bool) -> None:
        if remove_own:
            remove(self._dir / self._name)
        for path in self._taken:
            remove(path)
        self._taken = []

    async def _set_aside_stale(self) -> None:
        now = time.time()
        stale = [b for b in self._held if b.sent is not None and now - b.sent > REPLAY_WITHIN]
        if stale:
            self._release(stale)
            await self._set_aside(f"stale-{int(now)}-{self._name}", stale)

    async def _set_aside(self, name: str, batches: list[_Batch]) -> None:
        """Keep batches that cannot be replayed safely in a file no process takes."""
        body = json.dumps({"version": _VERSION, "fleet": self._fleet,
                           "batches": [b.encode() for b in batches]}).encode()
        try:
            await asyncio.to_thread(write_file, self._dir, name, body)
            where = str(self._dir / name)
        except OSError as exc:
            where = f"nowhere ({exc})"
        self._log.error("%d usage events first sent more than %d days ago are not replayed "
                        "(Redis forgets a replica's batches after %d days: they might count "
                        "twice); kept in %s", sum(b.events for b in batches),
                        REPLAY_WITHIN // DAY, KEEP_APPLIERS // DAY, where)

    def _notify(self, failed: bool) -> None:
        if self.observer is not None:
            self.observer(self.pending, failed)


# readers and the migration ------------------------------------------------------------------
async def _run_many(link: FleetLink, source: str, calls: Sequence[tuple[list[str], list[Any]]],
                    chunk: int = _CHUNK) -> list[Any]:
    script = link.script(source)
    out: list[Any] = []
    for i in range(0, len(calls), chunk):
        out += await asyncio.gather(*[link.run_soon(script, k, a) for k, a in calls[i:i + chunk]])
    return out


async def _usage_keys(link: FleetLink) -> list[str]:
    return sorted(_text(m) for m in await link.command("SMEMBERS", link.name("usage", "keys")))


async def read_usage(link: FleetLink, key_id: str | None = None, since: float | None = None,
                     until: float | None = None) -> list[UsageRow]:
    """Rows for hours overlapping ``[since, until)``, ordered as ``UsageStore.usage`` orders
    them (hour, key, model); every key with usage when ``key_id`` is None. Raises FleetDown."""
    key_ids = [key_id] if key_id is not None else await _usage_keys(link)
    lo = -math.inf if since is None else hour_bucket(since)
    hi = math.inf if until is None else until
    days_lo = "-inf" if since is None else str(hour_bucket(since) // DAY)
    days_hi = "+inf" if until is None else str(math.floor(until / DAY))
    found = await _run_many(link, _RANGE, [([link.of_key(k, "usage:days")], [days_lo, days_hi])
                                           for k in key_ids])
    wanted = [(k, _text(d)) for k, days in zip(key_ids, found, strict=True) for d in days]
    hashes = await _run_many(link, _HGETALL, [([link.of_key(k, f"usage:{d}")], []) for k, d in wanted])
    totals: dict[tuple[str, str, int], list[int]] = {}
    for (k, _), flat in zip(wanted, hashes, strict=True):
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            hour_text, _, rest = _text(field).partition("|")
            model, _, kind = rest.rpartition("|")
            hour = int(hour_text)
            if lo <= hour < hi:
                totals.setdefault((k, model, hour), [0, 0, 0])["rpc".index(kind)] += int(value)
    rows = [UsageRow(k, m, h, *t) for (k, m, h), t in totals.items()]
    rows.sort(key=lambda r: (r.hour, r.key_id, r.model))
    return rows


async def read_last_used(link: FleetLink, key_id: str) -> float | None:
    """Latest request time of a key in the fleet. Raises FleetDown."""
    value = await link.command("GET", link.of_key(key_id, "usage:last"))
    return None if value is None else float(value)


async def last_used_all(link: FleetLink) -> dict[str, float]:
    """Latest request time of every key with usage. Raises FleetDown."""
    key_ids = await _usage_keys(link)
    values = await _run_many(link, _GET, [([link.of_key(k, "usage:last")], []) for k in key_ids])
    return {k: float(v) for k, v in zip(key_ids, values, strict=True) if v is not None}


async def import_rows(link: FleetLink, rows: Iterable[UsageRow], last_used: Mapping[str, float],
                      *, retention_days: int = 400) -> tuple[int, int]:
    """Add SQLite usage rows to the fleet's counters; returns (rows changed, rows already there).
    Each key's rows go in one script that adds only what earlier imports did not (kept in
    ``usage:migrated``), so a rerun after the rows grew adds the difference. Rows of days past
    the retention are skipped and counted in neither. Raises FleetDown."""
    per_key: dict[str, dict[tuple[str, int], list[int]]] = {}
    for r in rows:
        t = per_key.setdefault(r.key_id, {}).setdefault((r.model, r.hour), [0, 0, 0])
        t[0] += r.requests
        t[1] += r.prompt_tokens
        t[2] += r.completion_tokens
    key_ids = sorted(set(per_key) | set(last_used))
    calls = []
    for k in key_ids:
        keys = [link.of_key(k, "usage:migrated"), link.of_key(k, "usage:days"),
                link.of_key(k, "usage:last")]
        args: list[Any] = ["" if k not in last_used else repr(float(last_used[k])), retention_days]
        for (model, hour), (req, prompt, completion) in sorted(per_key.get(k, {}).items()):
            name = _day_name(hour)
            keys.append(link.of_key(k, f"usage:{name}"))
            args += [hour // DAY, name, f"{hour}|{model}", req, prompt, completion]
        calls.append((keys, args))
    for i in range(0, len(key_ids), 1000):
        await link.command("SADD", link.name("usage", "keys"), *key_ids[i:i + 1000])
    results = await _run_many(link, IMPORT, calls, chunk=16)
    return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)

