"""sha256 of model files, computed only when asked and remembered across restarts.

Hashing a 40 GB file takes minutes, so the registry never does it during a scan.
An entry is valid while the file keeps the same (size, mtime_ns); anything else
(a rewrite, a copy over it) makes the next ``get`` hash again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from backend.models.jsonfile import read_json, write_json_atomic

_BLOCK = 4 * 1024 * 1024


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class Sha256Cache:
    """Thread-safe; ``get`` blocks while hashing, so call it from a worker thread."""

    def __init__(self, cache_file: Path, *, hasher: Callable[[Path], str] = hash_file) -> None:
        self._file = cache_file
        self._hasher = hasher
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, int | str]] | None = None

    def get(self, path: Path) -> str:
        """The file's sha256 (hex), from the cache when size and mtime still match."""
        key, size, mtime_ns = _identity(path)
        cached = self.peek(path)
        if cached is not None:
            return cached
        sha = self._hasher(path)
        # Only remember the hash if the file did not change while we read it.
        if _identity(path) == (key, size, mtime_ns):
            self._store(key, size, mtime_ns, sha)
        return sha

    def peek(self, path: Path) -> str | None:
        """The cached sha256 if it is still valid; never hashes."""
        try:
            key, size, mtime_ns = _identity(path)
        except FileNotFoundError:
            return None
        with self._lock:
            entry = self._load().get(key)
        if entry and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) else None
        return None

    def put(self, path: Path, sha256: str) -> None:
        """Record a hash verified elsewhere (e.g. by a pull) for the file as it is now."""
        key, size, mtime_ns = _identity(path)
        self._store(key, size, mtime_ns, sha256)

    def _store(self, key: str, size: int, mtime_ns: int, sha: str) -> None:
        with self._lock:
            entries = self._load()
            entries[key] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha}
            # Drop entries of files that are gone so the cache does not grow forever.
            for stale in [k for k in entries if k != key and not os.path.exists(k)]:
                del entries[stale]
            write_json_atomic(self._file, {"version": 1, "files": entries})

    def _load(self) -> dict[str, dict[str, int | str]]:
        if self._entries is None:
            try:
                data = read_json(self._file)
            except ValueError:
                data = None  # a corrupt cache only costs re-hashing
            files = data.get("files") if isinstance(data, dict) else None
            self._entries = dict(files) if isinstance(files, dict) else {}
        return self._entries


def _identity(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns
