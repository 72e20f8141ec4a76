"""Failed authentications per client address, counted by every gateway worker together
(GATEWAY_WORKERS > 1).

Each worker has its own `AddressThrottle`, so N workers would let an address fail N
times AUTH_FAILURES_PER_MINUTE. Here the addresses' GCRA times live in a file in the
runtime directory that every worker maps (each worker creates it if it is not there
yet: a fixed size, zero-filled, so creating it twice loses nothing). Time is
CLOCK_MONOTONIC, the same in every process.

Addresses are unbounded, so the file is a set-associative cache: an address hashes
to a bucket of a few records; a new one takes a free record, or else the one whose
budget is whole again soonest (the address closest to being forgotten anyway).
Lookups read without a lock (8-byte aligned values); failures write under a lock on
their bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.policy.throttle import AddressThrottle, counted_as

BUCKETS = 4096
WAYS = 8
_RECORD = struct.Struct("<Qd")  # the address's hash (0: free), when its budget is whole again
_BUCKET = struct.Struct("<" + "Qd" * WAYS)  # a bucket read whole: one call, not eight
# addresses whose hash and bucket this worker has worked out (the hash is most of a lookup)
_REMEMBERED = 4096


def file_size(buckets: int = BUCKETS) -> int:
    return buckets * WAYS * _RECORD.size


class SharedAddressThrottle(AddressThrottle):
    def __init__(self, path: Path, per_minute: int, *, buckets: int = BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(per_minute, clock=clock)
        self.buckets = buckets
        size = file_size(buckets)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self.map = mmap.mmap(self._fd, size)
        self._where_of: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        self.map.close()
        os.close(self._fd)

    def retry_after(self, address: str) -> float:
        digest, base = self._where(address)
        bucket = _BUCKET.unpack_from(self.map, base)
        for i in range(0, 2 * WAYS, 2):
            if bucket[i] == digest:
                wait: float = bucket[i + 1] - self.clock() - self.tolerance
                return max(0.0, wait)
        return 0.0

    def failure(self, address: str) -> None:
        digest, base = self._where(address)
        now = self.clock()
        with self._locked(base):
            oldest, oldest_clear = base, float("inf")
            for at in range(base, base + WAYS * _RECORD.size, _RECORD.size):
                found, clear_at = _RECORD.unpack_from(self.map, at)
                if found == digest:
                    _RECORD.pack_into(self.map, at, digest, max(clear_at, now) + self.interval)
                    return
                if found == 0 or clear_at < oldest_clear:
                    oldest, oldest_clear = at, -1.0 if found == 0 else clear_at
            _RECORD.pack_into(self.map, oldest, digest, now + self.interval)

    def _where(self, address: str) -> tuple[int, int]:
        """The address's hash (never 0) and the offset of its bucket."""
        where = self._where_of.get(address)
        if where is None:
            digest = int.from_bytes(hashlib.blake2b(counted_as(address).encode(),
                                                    digest_size=8).digest(), "little") or 1
            where = digest, (digest % self.buckets) * WAYS * _RECORD.size
            if len(self._where_of) >= _REMEMBERED:
                self._where_of.clear()
            self._where_of[address] = where
        return where

    @contextlib.contextmanager
    def _locked(self, base: int) -> Iterator[None]:
        length = WAYS * _RECORD.size
        fcntl.lockf(self._fd, fcntl.LOCK_EX, length, base)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, base)
