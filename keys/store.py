"""The keys file: the only code that reads or writes it.

Writes are atomic (temp file in the same directory, fsync, ``os.replace``, fsync of the directory),
so a reader sees either the old or the new file, never half of one; readers therefore need no lock.
Read-modify-write cycles hold a ``FileLock`` on ``<path>.lock`` so two CLI invocations at once
cannot lose each other's update.
"""

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, TypeVar

import filelock

from core.private_files import private_dir
from keys.codec import check_unique, dump_keys, parse_keys
from keys.errors import KeyFileError, KeyFormatError, describe_error
from keys.model import ApiKey

FILE_MODE: Final = 0o600
# The keys of the latest good load, beside the file: what a worker started while the file is
# corrupt serves with (issue 22). Hashes only, like the file; 0600 too.
LAST_GOOD_SUFFIX: Final = ".last-good"
T = TypeVar("T")
KeySet = tuple[ApiKey, ...]


def read_keys_file(path: Path) -> KeySet:
    """Read and parse the keys file.

    Raises FileNotFoundError when it does not exist (callers decide what that means) and
    KeyFileError when it cannot be read or is malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read keys file {path}: {describe_error(exc)}") from exc
    try:
        return parse_keys(text)
    except KeyFormatError as exc:
        raise KeyFileError(f"keys file {path} is invalid: {exc}") from exc


def write_keys_file(path: Path, keys: Iterable[ApiKey]) -> None:
    """Atomically replace the keys file with ``keys``; the file ends up with mode 0600.

    Raises KeyFormatError, writing nothing, if two keys share an id or secret: the store never
    writes a file that a reload would reject.
    """
    keys = tuple(keys)
    check_unique(keys)
    try:
        private_dir(path.parent)
        _write_atomic(path, dump_keys(keys).encode("utf-8"))
    except OSError as exc:
        raise KeyFileError(f"cannot write keys file {path}: {describe_error(exc)}") from exc
    # The last good copy is older than this file now: were this file damaged before a
    # worker loads it, a worker starting then must not bring back a key just revoked.
    # The next successful load writes a new copy.
    with contextlib.suppress(OSError):
        os.unlink(last_good_path(path))


def last_good_path(path: Path) -> Path:
    """Where the last good keys of the keys file ``path`` are kept."""
    return path.with_name(path.name + LAST_GOOD_SUFFIX)


def save_last_good(path: Path, keys: KeySet) -> bool:
    """Keep ``keys``, just loaded from ``path``, as its last good set; returns whether the
    copy changed. Raises OSError when it cannot be written."""
    copy = last_good_path(path)
    data = dump_keys(keys).encode("utf-8")
    with contextlib.suppress(OSError):
        if copy.read_bytes() == data:
            return False
    _write_atomic(copy, data)
    return True


def read_last_good(path: Path) -> tuple[KeySet, float]:
    """The last good keys of the keys file ``path`` and when they were saved. Raises
    FileNotFoundError when there is no copy and KeyFileError when it cannot be used."""
    copy = last_good_path(path)
    keys = read_keys_file(copy)
    try:
        saved = os.stat(copy).st_mtime
    except OSError as exc:
        raise KeyFileError(f"cannot read keys file {copy}: {describe_error(exc)}") from exc
    return keys, saved


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp already uses 0600; set it anyway because the mode is part of the contract.
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open directories, which only
    # weakens durability after a power cut, never atomicity.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class KeyStore:
    """The keys file at ``path`` with locked read-modify-write."""

    def __init__(self, path: Path, *, lock_timeout: float = 10.0) -> None:
        self._path = path
        self._lock_timeout = lock_timeout

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> KeySet:
        """Return the stored keys; a missing file holds no keys."""
        try:
            return read_keys_file(self._path)
        except FileNotFoundError:
            return ()

    def update(self, change: Callable[[KeySet], tuple[KeySet, T]]) -> T:
        """Apply ``change`` to the stored keys under the file lock and save what it returns.

        ``change`` gets the current keys and returns ``(new_keys, result)``; ``result`` is passed
        back. If it raises, nothing is written. The file is rewritten only when the keys changed.
        Raises KeyFileError if the lock cannot be taken within the timeout.
        """
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            private_dir(self._path.parent)
            lock = filelock.FileLock(lock_path, timeout=self._lock_timeout, mode=FILE_MODE)
            with lock:
                current = self.load()
                new_keys, result = change(current)
                if new_keys != current:
                    write_keys_file(self._path, new_keys)
                return result
        except filelock.Timeout:
            raise KeyFileError(
                f"keys file {self._path} is locked by another process (waited {self._lock_timeout:g}s)"
            ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot lock keys file {self._path}: {describe_error(exc)}") from exc
