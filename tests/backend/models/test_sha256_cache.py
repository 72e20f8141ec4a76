from __future__ import annotations

import hashlib
import os
from pathlib import Path

from backend.models.sha256_cache import Sha256Cache, hash_file


class CountingHasher:
    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.calls.append(path)
        return hash_file(path)


def test_hash_is_lazy_cached_and_persisted(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    hasher = CountingHasher()
    cache = Sha256Cache(tmp_path / "data" / "sha256.json", hasher=hasher)

    assert cache.peek(model) is None
    assert hasher.calls == []  # nothing is hashed until asked
    assert cache.get(model) == expected
    assert cache.get(model) == expected
    assert len(hasher.calls) == 1

    again = CountingHasher()
    reopened = Sha256Cache(tmp_path / "data" / "sha256.json", hasher=again)
    assert reopened.get(model) == expected
    assert again.calls == []


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"one")
    hasher = CountingHasher()
    cache = Sha256Cache(tmp_path / "sha256.json", hasher=hasher)
    cache.get(model)
    model.write_bytes(b"two")
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.get(model) == hashlib.sha256(b"two").hexdigest()
    assert len(hasher.calls) == 2


def test_put_primes_and_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    cache_file = tmp_path / "sha256.json"
    cache_file.write_text("{not json")
    hasher = CountingHasher()
    cache = Sha256Cache(cache_file, hasher=hasher)
    cache.put(model, "ab" * 32)
    assert cache.get(model) == "ab" * 32
    assert hasher.calls == []
