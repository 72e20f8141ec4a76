"""Buffered usage recording for the request path.

``record()`` folds the request into per-(key, model, hour) counters: a dict update, no I/O, no
await. The recorder's own flusher task writes those few rows in a worker thread at most every
``flush_interval`` seconds; ``close()`` stops the task and flushes what is left. (Folding in
the thread instead held the GIL for milliseconds a flush at thousands of requests/s: a stall
every request in flight then waited out.)

If a write fails (disk full, database locked too long) the rows go back and are retried; past
``max_rows`` distinct (key, model, hour) rows, events that would need a new row are dropped and
counted, so a stuck disk cannot grow memory without bound.
"""

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from keys.db import open_db
from keys.usage import HOUR, Tally, UsageRow, UsageStore

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class UsageRecorder:
    """Owns the usage database connection and its flusher task."""

    def __init__(
        self,
        db_path: Path,
        *,
        flush_interval: float = 1.0,
        max_rows: int = 100_000,
        sleep: Sleep = asyncio.sleep,
        logger: logging.Logger | None = None,
    ) -> None:
        self._db_path = db_path
        self._interval = flush_interval
        self._max_rows = max_rows
        self._sleep = sleep
        self._log = logger or logging.getLogger("llamagate.keys")
        self._pending = Tally()
        self._dropped = 0
        self._closed = False
        self._store: UsageStore | None = None
        self._conn: sqlite3.Connection | None = None
        # The connection is used from worker threads, one call at a time.
        self._db_lock = threading.Lock()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Events recorded but not yet written."""
        return self._pending.events

    @property
    def dropped(self) -> int:
        """Events discarded because the buffer was full or the recorder closed."""
        return self._dropped

    async def open(self) -> None:
        """Open the database (in a thread; creating the schema touches the disk)."""
        conn = await asyncio.to_thread(open_db, self._db_path, any_thread=True)
        self._conn = conn
        self._store = UsageStore(conn)

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
        """Write everything buffered so far; returns the number of events written."""
        async with self._flush_lock:
            if not self._pending.events and not self._pending.last_used:
                return 0
            if self._store is None:
                raise RuntimeError("UsageRecorder.open() has not been called")
            tally, self._pending = self._pending, Tally()
            batch = tally.batch()
            try:
                await self._in_thread(lambda store: store.write(batch))
            except (sqlite3.Error, OSError) as exc:
                # what arrived meanwhile is added to the batch: rows only grow by new hours
                tally.merge(self._pending)
                self._pending = tally
                self._log.error("usage flush failed, %d events kept for retry: %s",
                                tally.events, exc)
                return 0
            return tally.events

    async def close(self) -> None:
        """Stop the flusher, write what is left, close the database."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                self._log.error("usage flusher had stopped: %r", task.exception())
        if self._conn is not None:
            await self.flush()
            if self._pending.events:
                self._log.error("dropping %d usage events that could not be written",
                                self._pending.events)
                self._dropped += self._pending.events
                self._pending = Tally()
            conn, self._conn, self._store = self._conn, None, None
            await asyncio.to_thread(self._close_conn, conn)

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
        store = self._store
        if store is None:
            raise RuntimeError("UsageRecorder.open() has not been called")

        def locked() -> T:
            with self._db_lock:
                return call(store)

        return await asyncio.to_thread(locked)

    def _close_conn(self, conn: sqlite3.Connection) -> None:
        with self._db_lock:
            conn.close()
