"""Usage counted in the fleet's Redis (REDIS_URL): the interface of ``UsageRecorder``, so the
gateway holds either, with every replica adding to one set of counters (issue 23). The layout
and scripts are keys/usage_redis_scripts.py's; the readers keys/usage_redis_read.py's.

    record() -> tally -> batches (keys/usage_redis_batch.py) -> APPLY in Redis
                                  `-> the buffer file while Redis is away (keys/usage_redis_buffer.py)

Exactly once: ``record()`` folds into a tally in memory; every ``flush_interval`` the tally is
cut into one batch per key, all numbered with the next sequence of this replica, and each is
applied by a script that skips a (replica, seq) not above the one it last applied. A batch
whose answer was lost (Redis applied it, then the timeout fired) is resent unchanged and
counted once. A batch once sent is never merged with anything, and the batches of one replica
and key are sent oldest first: a newer one applied first would make the older look applied.
Events recorded while Redis is down fold into one tally that was never sent (safe to merge).

Outage: the batches waiting and that tally are kept in the buffer file, rewritten as they
change. The flusher does not try Redis while the link says it is down; the link's probe wakes
it when Redis answers, and the buffer is replayed. At ``open()``, buffer files of processes
that are gone are replayed under their own replica and sequences; batches too old to replay
safely are set aside (keys/usage_redis_buffer.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from fleet.link import FleetLink
from keys.usage import HOUR, Tally, UsageRow
from keys.usage_redis_batch import Batch, BatchSender, cut
from keys.usage_redis_buffer import (
    PREFIX,
    REPLAY_WITHIN,
    encode_buffer,
    encode_set_aside,
    orphans,
    remove,
    unsafe_to_replay,
    write_file,
)
from keys.usage_redis_read import read_last_used, read_usage
from keys.usage_redis_scripts import DAY, KEEP_APPLIERS

Observer = Callable[[int, bool], None]  # (events pending, whether this flush failed), as UsageRecorder's


class RedisUsage:
    """This process's usage on its way to the fleet's counters: the tally, the batches waiting
    for Redis, the buffer file and the flusher task."""

    def __init__(self, link: FleetLink, *, flush_interval: float = 1.0, buffer_dir: Path,
                 retention_days: int = 400, max_rows: int = 100_000,
                 logger: logging.Logger | None = None) -> None:
        self._link = link
        self._interval = flush_interval
        self._dir = buffer_dir
        self._max_rows = max_rows
        self._log = logger or logging.getLogger("llamagate.keys")
        self._sender = BatchSender(link, retention_days)
        # the link's replica, and this recorder's: two recorders on one link (a test, a restart
        # of the app in one process) must not share sequence numbers
        self._replica = f"{link.replica}.{secrets.token_hex(2)}"
        self._fleet = f"{link.where} {link.prefix}"  # a file is replayed into its own fleet only
        self._name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json"
        self.observer: Observer | None = None
        self._tally = Tally()  # never sent: merged freely
        self._held: list[Batch] = []  # numbered, not acknowledged; oldest first in each lane
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
            stale = unsafe_to_replay(t.batches, time.time())
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
        """The fleet's usage rows (see ``read_usage``); call ``flush()`` first for fresh data.
        Raises FleetDown while Redis is unreachable."""
        return await read_usage(self._link, key_id, since, until)

    async def last_used(self, key_id: str) -> float | None:
        """Latest request time of a key, over the fleet. Raises FleetDown."""
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
    async def _send_held(self) -> tuple[int, str | None, bool]:
        """Resend the waiting batches, each lane (replica, key) oldest first: a newer batch
        applied first would make the older one look applied."""
        written, error, stuck = 0, None, set[tuple[str, str]]()
        while True:
            heads: dict[tuple[str, str], Batch] = {}
            for b in self._held:
                heads.setdefault((b.replica, b.key_id), b)
            batches = [b for lane, b in heads.items() if lane not in stuck]
            if not batches:
                return written, error, False
            acked, err, down = await self._sender.send(batches)
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
        acked, error, down = await self._sender.send(batches)
        done = [b for b, ok in zip(batches, acked, strict=True) if ok]
        self._release(done)
        return sum(b.events for b in done), error, down

    def _hold(self, batches: list[Batch]) -> None:
        self._held += batches
        self._held_rows += sum(len(b.rows) for b in batches)
        self._held_events += sum(b.events for b in batches)

    def _release(self, batches: list[Batch]) -> None:
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
        stale = unsafe_to_replay(self._held, now)
        if stale:
            self._release(stale)
            await self._set_aside(f"stale-{int(now)}-{self._name}", stale)

    async def _set_aside(self, name: str, batches: list[Batch]) -> None:
        """Keep batches that cannot be replayed safely in a file no process takes."""
        body = encode_set_aside(self._fleet, batches)
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

