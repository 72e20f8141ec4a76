"""Buffered usage recording for the request path.

``record()`` only appends to a list: no I/O, no await. The recorder's own flusher task folds the
buffer into per-hour increments and writes them in a worker thread at most every
``flush_interval`` seconds; ``close()`` stops the task and flushes what is left.

If a write fails (disk full, database locked too long) the events go back into the buffer and
are retried; past ``max_pending`` new events are dropped and counted, so a stuck disk cannot
grow memory without bound.
"""

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from keys.db import open_db
from keys.usage import UsageEvent, UsageRow, UsageStore, aggregate

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class UsageRecorder:
    """Owns the usage database connection and its flusher task."""

    def __init__(
        self,
        db_path: Path,
        *,
        flush_interval: float = 1.0,
        max_pending: int = 100_000,
        sleep: Sleep = asyncio.sleep,
        logger: logging.Logger | None = None,
    ) -> None:
        self._db_path = db_path
        self._interval = flush_interval
        self._max_pending = max_pending
        self._sleep = sleep
        self._log = logger or logging.getLogger("llamagate.keys")
        self._pending: list[UsageEvent] = []
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
        return len(self._pending)

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
        if self._closed or len(self._pending) >= self._max_pending:
            self._dropped += 1
            return
        self._pending.append(UsageEvent(key_id, model, prompt_tokens, completion_tokens, ts))

    async def flush(self) -> int:
        """Write everything buffered so far; returns the number of events written."""
        async with self._flush_lock:
            if not self._pending:
                return 0
            if self._store is None:
                raise RuntimeError("UsageRecorder.open() has not been called")
            batch, self._pending = self._pending, []
            try:
                await self._in_thread(lambda store: store.write(aggregate(batch)))
            except (sqlite3.Error, OSError) as exc:
                room = max(self._max_pending - len(self._pending), 0)
                self._dropped += max(len(batch) - room, 0)
                self._pending[:0] = batch[:room]
                self._log.error(
                    "usage flush failed, %d events kept for retry: %s", min(len(batch), room), exc
                )
                return 0
            return len(batch)

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
            if self._pending:
                self._log.error("dropping %d usage events that could not be written", len(self._pending))
                self._dropped += len(self._pending)
                self._pending = []
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
