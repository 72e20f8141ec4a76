"""Per-key rate limits shared by every gateway worker (GATEWAY_WORKERS > 1).

Each worker has its own event loop, so a `RateLimiter` in each would grant a key N
times its requests and tokens per minute. With several workers, each key's buckets
live in one file that serve creates in its runtime directory and every worker maps
into memory; an operation on a key (admit, reserve, release, headers) reads and
writes them under an exclusive lock on that key's record. The bucket arithmetic is
gateway/policy/ratelimit.py's: only where the numbers live changes.

A record per key: a hash of its id, the request bucket's level and time, the token
bucket's, then one counter per worker of the key's requests in flight. Each worker
writes only its own counter and zeroes it when it starts; serve zeroes a crashed
worker's at once (release_worker), before restarting it. Only keys with a limit take a record;
one that finds the table full is limited by its worker alone, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from gateway.policy.buckets import KeyLimiter, MakeLimiter, TokenBucket
from keys.model import Limits

log = logging.getLogger("llamagate.gateway.limits")

SLOTS = 16_384
_HEAD = struct.Struct("<16s4d")  # key hash; requests level, updated; tokens level, updated
_COUNT = struct.Struct("<i")
_LEVEL = struct.Struct("<2d")  # one bucket of a record: level, updated
_REQUESTS, _TOKENS = 16, 32  # offsets of the two buckets in a record


def record_size(workers: int) -> int:
    return _HEAD.size + _COUNT.size * workers


def create(path: Path, workers: int, slots: int = SLOTS) -> None:
    """The serve process's part: an empty table (zero-filled, so sparse on disk), 0600 as
    every data file (core/private_files.py)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older 0644 table keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.truncate(slots * record_size(workers))


class SharedTable:
    """One worker's view of the table."""

    def __init__(self, path: Path, workers: int, index: int, slots: int = SLOTS) -> None:
        self.workers, self.index, self.slots = workers, index, slots
        self.size = record_size(workers)
        self._fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self._fd, slots * self.size)
        self._found: dict[str, int] = {}
        self._full_warned = False
        with self.locked():  # a restarted worker: its old counts are void
            for slot in range(slots):
                _COUNT.pack_into(self.map, self._count_at(slot * self.size, index), 0)

    def close(self) -> None:
        self.map.close()
        os.close(self._fd)

    @contextlib.contextmanager
    def locked(self, record: int | None = None) -> Iterator[None]:
        """Exclusive use of one record, or of the whole table (``None``). POSIX record locks:
        held per process, released by the kernel if the process dies holding one."""
        length, start = (0, 0) if record is None else (self.size, record)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, length, start)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start)

    def record(self, key_id: str) -> int | None:
        """Offset of the key's record (claimed on first use); None when the table is full."""
        offset = self._found.get(key_id)
        if offset is not None:
            return offset
        digest = hashlib.blake2b(key_id.encode(), digest_size=16).digest()
        start = int.from_bytes(digest[:8], "little") % self.slots
        with self.locked():
            for probe in range(self.slots):
                at = ((start + probe) % self.slots) * self.size
                stored = bytes(self.map[at:at + 16])
                if stored == digest or stored == bytes(16):
                    if stored != digest:
                        self.map[at:at + 16] = digest
                    self._found[key_id] = at
                    return at
        if not self._full_warned:
            self._full_warned = True
            log.warning("the shared rate-limit table is full: keys beyond it are limited per worker")
        return None

    def _count_at(self, record: int, worker: int) -> int:
        return record + _HEAD.size + _COUNT.size * worker

    def in_flight(self, record: int) -> int:
        return sum(_COUNT.unpack_from(self.map, self._count_at(record, w))[0]
                   for w in range(self.workers))

    def add_own(self, record: int, change: int) -> None:
        """Change this worker's count of the key's requests in flight."""
        own = self._count_at(record, self.index)
        _COUNT.pack_into(self.map, own, _COUNT.unpack_from(self.map, own)[0] + change)


class SharedBucket(TokenBucket):
    """A token bucket whose level and time are in the table; ``capacity`` is this worker's
    reading of the key's limit."""

    __slots__ = ("_at", "_map")

    def __init__(self, capacity: int, now: float, table: SharedTable, at: int) -> None:
        self._map, self._at = table.map, at
        self.capacity = float(capacity)
        self.rate = capacity / 60.0
        if self.load()[1] == 0.0:  # never used by any worker
            self.store(self.capacity, now)
        else:  # a limit changed by a keys reload: keep what is used of it
            level, updated = self._refilled(now)
            self.store(min(self.capacity, level), updated)

    def load(self) -> tuple[float, float]:
        level, updated = _LEVEL.unpack_from(self._map, self._at)
        return float(level), float(updated)

    def store(self, level: float, updated: float) -> None:
        _LEVEL.pack_into(self._map, self._at, level, updated)


class SharedKeyLimiter(KeyLimiter):
    """A key's limits, counted across all workers."""

    def __init__(self, table: SharedTable, at: int, limits: Limits, now: float) -> None:
        self.table, self.at = table, at
        with table.locked(at):
            super().__init__(limits, now)

    def _bucket(self, kind: str, bucket: TokenBucket | None, per_minute: int | None,
                now: float) -> TokenBucket | None:
        if per_minute is None:
            return None
        return SharedBucket(per_minute, now, self.table,
                            self.at + (_REQUESTS if kind == "requests" else _TOKENS))

    def in_flight(self) -> int:
        return self.table.in_flight(self.at)

    def _hold(self, change: int) -> None:
        self.table.add_own(self.at, change)

    def reconfigure(self, limits: Limits, now: float) -> None:
        with self.table.locked(self.at):
            super().reconfigure(limits, now)

    def admit(self, now: float) -> None:
        with self.table.locked(self.at):
            super().admit(now)

    def reserve(self, amount: int, now: float, asked: bool = True) -> int:
        with self.table.locked(self.at):
            return super().reserve(amount, now, asked)

    def release(self, reserved: int, used: int | None, now: float) -> None:
        with self.table.locked(self.at):
            super().release(reserved, used, now)

    def headers(self, now: float) -> dict[str, str]:
        with self.table.locked(self.at):
            return super().headers(now)


def release_worker(path: Path, workers: int, index: int, slots: int = SLOTS) -> None:
    """serve's part when worker ``index`` dies: its requests in flight are void (opening the
    table as that worker zeroes them)."""
    SharedTable(path, workers, index, slots).close()


def limiters(table: SharedTable) -> MakeLimiter:
    """What `RateLimiter` makes a key's limiter with: shared for a key with a limit."""
    def make(key_id: str, limits: Limits, now: float) -> KeyLimiter:
        if limits == Limits():  # unlimited: nothing to count, nothing to lock
            return KeyLimiter(limits, now)
        at = table.record(key_id)
        return KeyLimiter(limits, now) if at is None else SharedKeyLimiter(table, at, limits, now)
    return make
