"""Buffered usage recording for the request path.

``record()`` folds the request into per-(key, model, hour) counters: a dict update, no I/O, no
await. The recorder's own flusher task writes those few rows in a worker thread at most every
``flush_interval`` seconds; ``close()`` stops the task and flushes what is left. (Folding in
the thread instead held the GIL for milliseconds a flush at thousands of requests/s: a stall
every request in flight then waited out.)

If a write fails (disk full, read-only or immutable file, database locked too long) the rows go
back and are retried; past ``max_rows`` distinct (key, model, hour) rows, events that would need
a new row are dropped and counted, so a stuck disk cannot grow memory without bound. A failed
write closes the connection and the next attempt opens a new one, after a backoff of up to
``RETRY_MAX`` seconds: SQLite opens a file it cannot write read-only and keeps it so, which
once left a worker failing every flush after the disk was fixed (issue 22). The database need
not open at all for the recorder to start: the gateway serves, and the usage waits.

While writes fail, the pending tally is also kept in a spool file (keys/usage_spool.py) on
another filesystem, so a worker killed meanwhile loses nothing: the next recorder to write the
database adds the spools of recorders that are gone, each exactly once. Failures are logged
when the state changes (writing → failing → writing), not at every attempt; ``report()`` is
the state for the health tier, ``observer`` hears every flush (the gateway's metrics).
"""

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

from keys import usage_spool
from keys.db import open_db
from keys.usage import HOUR, Tally, UsageRow, UsageStore

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
# (events pending, whether this flush's write failed)
Observer = Callable[[int, bool], None]
RETRY_MAX: Final = 10.0  # seconds: the longest wait between attempts on a failing database


class UsageRecorder:
    """Owns the usage database connection, its flusher task and this process's spool."""

    def __init__(
        self,
        db_path: Path,
        *,
        flush_interval: float = 1.0,
        max_rows: int = 100_000,
        spool_dir: Path | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self._db_path = db_path
        self._interval = flush_interval
        self._max_rows = max_rows
        self._spool_dir = spool_dir  # None: nothing outlives the process
        self._spool_name = f"{usage_spool.PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json"
        self._sleep = sleep
        self._clock = clock
        self._log = logger or logging.getLogger("llamagate.keys")
        self.observer: Observer | None = None
        self._pending = Tally()
        self._dropped = 0
        self._opened = False
        self._closed = False
        self._store: UsageStore | None = None
        self._conn: sqlite3.Connection | None = None
        # The connection is used from worker threads, one call at a time.
        self._db_lock = threading.Lock()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None  # why the latest write failed; None while writing works
        self._failing_since: float | None = None
        self._attempts = 0
        self._retry_at = 0.0
        self._failures = 0
        self._orphans = False  # spools of recorders that are gone may wait to be written
        self._spool_token: str | None = None  # the token of our spool on disk
        self._spooled = (0, 0)  # (events, keys) of that spool: unchanged tallies are not rewritten
        self._spool_error: str | None = None
        self._bad_spools: set[Path] = set()

    @property
    def pending(self) -> int:
        """Events recorded but not yet written."""
        return self._pending.events

    @property
    def dropped(self) -> int:
        """Events discarded because the buffer was full or the recorder closed."""
        return self._dropped

    @property
    def write_failures(self) -> int:
        """Attempts to open or write the database that failed."""
        return self._failures

    @property
    def spool_path(self) -> Path | None:
        """This recorder's spool file while it holds events, else None."""
        if self._spool_dir is None or self._spool_token is None:
            return None
        return self._spool_dir / self._spool_name

    def report(self) -> dict[str, object]:
        """The state for /health: whether usage is being written, what waits, and why."""
        return {"ok": self._error is None, "pending": self._pending.events,
                "error": self._error, "failing_since": self._failing_since,
                "spooled": self._spool_token is not None, "dropped": self._dropped}

    async def open(self) -> None:
        """Open the database (in a thread; creating the schema touches the disk). A database
        that cannot be opened is retried by the flusher: the recorder works without it."""
        self._opened = True
        self._orphans = self._spool_dir is not None
        try:
            await asyncio.to_thread(self._locked_connect)
        except (sqlite3.Error, OSError) as exc:
            await self._failed(exc)

    def start(self) -> None:
        """Start the flusher task; ``close()`` stops it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flusher")

    def record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, ts: float) -> None:
        """Note one finished request. Never blocks and never raises on the request path."""
        pending = self._pending
        if self._closed or (len(pending) >= self._max_rows
                            and (key_id, model, int(ts // HOUR) * HOUR) not in pending.totals):
            self._dropped += 1
            return
        pending.add(key_id, model, prompt_tokens, completion_tokens, ts)

    def seen(self, key_id: str, ts: float) -> None:
        """Note a request of the key's: its last use, whether or not it used tokens."""
        if not self._closed:
            self._pending.seen(key_id, ts)

    async def flush(self) -> int:
        """Write everything buffered so far (and spools left by recorders that are gone);
        returns the number of this recorder's events written."""
        async with self._flush_lock:
            idle = not self._pending.events and not self._pending.last_used
            if idle and not self._orphans and self._error is None:
                return 0
            if not self._opened:
                raise RuntimeError("UsageRecorder.open() has not been called")
            if self._error is not None and self._clock() < self._retry_at:
                await self._spool()  # between attempts, the spool follows what arrives
                self._notify(False)
                return 0
            tally, self._pending = self._pending, Tally()
            try:
                recovered = await asyncio.to_thread(self._write, tally)
            except (sqlite3.Error, OSError) as exc:
                # what arrived meanwhile is added to the batch: rows only grow by new hours
                tally.merge(self._pending)
                self._pending = tally
                await self._failed(exc)
                return 0
            self._written(tally.events, recovered)
            return tally.events

    async def close(self) -> None:
        """Stop the flusher, write what is left (or spool it), close the database."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                self._log.error("usage flusher had stopped: %r", task.exception())
        if not self._opened:
            return
        self._retry_at = 0.0  # one last attempt, whatever the backoff
        await self.flush()
        if self._pending.events:
            await self._spool(final=True)
            # a spool is a snapshot of the pending tally: what it holds is kept, the rest lost
            kept = self._spooled[0] if self._spool_token is not None else 0
            if kept:
                self._log.warning("usage database still cannot be written: %d usage events "
                                  "spooled to %s for the next start", kept, self.spool_path)
            if self._pending.events > kept:
                self._log.error("dropping %d usage events that could not be written",
                                self._pending.events - kept)
                self._dropped += self._pending.events - kept
            self._pending = Tally()
        self._opened = False
        await asyncio.to_thread(self._disconnect)

    async def usage(
        self, key_id: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[UsageRow]:
        """Written usage rows (see ``UsageStore.usage``); call ``flush()`` first for fresh data."""
        return await self._in_thread(lambda store: store.usage(key_id, since, until))

    async def last_used(self, key_id: str) -> float | None:
        """Latest written request time of a key."""
        return await self._in_thread(lambda store: store.last_used(key_id))

    async def _run(self) -> None:
        while True:
            await self._sleep(self._interval)
            # Shielded so a close() arriving mid-write lets the write finish; close() then
            # waits for it through the flush lock.
            await asyncio.shield(self.flush())

    async def _in_thread(self, call: Callable[[UsageStore], T]) -> T:
        if not self._opened:
            raise RuntimeError("UsageRecorder.open() has not been called")

        def locked() -> T:
            with self._db_lock:
                return call(self._connect())

        return await asyncio.to_thread(locked)

    def _connect(self) -> UsageStore:
        """The store, opening the database if no connection is open. Under the db lock."""
        if self._store is None:
            conn = open_db(self._db_path, any_thread=True)
            self._conn, self._store = conn, UsageStore(conn)
        return self._store

    def _locked_connect(self) -> None:
        with self._db_lock:
            self._connect()

    def _disconnect(self) -> None:
        with self._db_lock:
            conn, self._conn, self._store = self._conn, None, None
            if conn is not None:
                conn.close()

    def _write(self, tally: Tally) -> int:
        """In a thread: write ``tally`` and the orphaned spools in one transaction, then
        delete the spools it covers. Returns the number of events recovered from spools."""
        found: list[usage_spool.Spool] = []
        with self._db_lock:
            store = self._connect()
            if self._orphans and self._spool_dir is not None:
                found, bad = usage_spool.orphans(self._spool_dir, self._spool_name)
                for path in set(bad) - self._bad_spools:
                    self._log.error("usage spool %s cannot be read; left in place", path)
                    self._bad_spools.add(path)
            if not tally.events and not tally.last_used and not found:
                store.probe()  # nothing to write: is the database writable again?
                return 0
            added = store.write(tally.batch(), self._spool_token,
                                [(s.token, s.batch) for s in found], now=time.time())
        # Committed: the tokens are recorded, so a crash before these deletions counts
        # nothing twice (the next reader finds the tokens and only deletes the files).
        own = self.spool_path
        if own is not None:
            usage_spool.remove(own)
        for spool in found:
            usage_spool.remove(spool.path)
        recovered = [s for s in found if s.token in added]
        for spool in recovered:
            self._log.warning("recovered %d usage events spooled by process %d", spool.events,
                              spool.pid)
        return sum(s.events for s in recovered)

    def _written(self, events: int, recovered: int) -> None:
        self._spool_token, self._spooled = None, (0, 0)
        self._orphans = False
        if self._error is not None:
            down = time.time() - (self._failing_since or time.time())
            self._log.warning("usage database %s is written again after %.1fs of failures; "
                              "%d waiting events written", self._db_path, down, events)
        self._error, self._failing_since, self._attempts = None, None, 0
        self._notify(False)

    async def _failed(self, exc: BaseException) -> None:
        """A write (or the opening) failed: drop the connection, which may be read-only for
        good, wait before the next attempt, and keep the pending events in the spool."""
        self._failures += 1
        self._attempts += 1
        self._retry_at = self._clock() + min(self._interval * 2 ** (self._attempts - 1), RETRY_MAX)
        with contextlib.suppress(sqlite3.Error):
            await asyncio.to_thread(self._disconnect)
        if self._error is None:
            self._failing_since = time.time()
            self._log.error("usage database %s cannot be written, %d events kept for retry "
                            "(spooled while it fails): %s", self._db_path, self._pending.events,
                            exc)
        self._error = str(exc) or type(exc).__name__
        await self._spool()
        self._notify(True)

    async def _spool(self, *, final: bool = False) -> None:
        """Replace our spool with the pending tally, where a later recorder will find it."""
        pending = self._pending
        snapshot = (pending.events, len(pending.last_used))
        if self._spool_dir is None or not pending.events \
                or (snapshot == self._spooled and not final):
            return
        token = secrets.token_hex(16)
        body = usage_spool.encode(pending, token, final=final)  # on the loop: record() mutates it
        try:
            await asyncio.to_thread(usage_spool.write_spool, self._spool_dir, self._spool_name, body)
        except OSError as exc:
            if self._spool_error is None:
                self._log.error("cannot spool usage to %s, %d events held in memory only: %s",
                                self._spool_dir, pending.events, exc)
            self._spool_error = str(exc)
            return
        if self._spool_error is not None:
            self._log.warning("usage spooled to %s again", self._spool_dir)
        self._spool_error = None
        self._spool_token, self._spooled = token, snapshot

    def _notify(self, failed: bool) -> None:
        if self.observer is not None:
            self.observer(self._pending.events, failed)
