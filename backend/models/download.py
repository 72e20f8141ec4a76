"""Download one remote file into its partial file, resuming, then verify and move it.

The partial file (see ``plan.partial_path``) only ever grows by bytes that arrived
in order, so after a crash or kill -9 its size is exactly where to resume; its
existing bytes are re-hashed once so the final sha256 covers the whole file.
An exclusive ``flock`` on it keeps two pulls from appending to the same bytes; the
kernel drops the lock when the process dies, so a crash never leaves it stuck.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from backend.models.errors import (
    HubUnavailable,
    PullCancelled,
    PullError,
    StorageError,
    VerificationFailed,
)
from backend.models.hub import HubClient, RemoteFile

_BLOCK = 4 * 1024 * 1024
_MAX_BACKOFF_S = 30.0


def backoff(first_s: float, failures: int) -> float:
    """The wait before the next try after ``failures`` network failures in a row."""
    return min(first_s * 2.0 ** (failures - 1), _MAX_BACKOFF_S)


class CancelToken:
    """Set from the event loop, checked by the download thread between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.discard_partial = False

    def cancel(self, *, discard_partial: bool) -> None:
        # discard_partial: a user cancel deletes the bytes; a shutdown keeps them to resume.
        # Sticky: a shutdown right after a user cancel must not resurrect the bytes.
        self.discard_partial = self.discard_partial or discard_partial
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise PullCancelled("cancelled")

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` unless cancelled first (then raise PullCancelled)."""
        if self._event.wait(seconds):
            raise PullCancelled("cancelled")


def download_file(
    hub: HubClient,
    remote: RemoteFile,
    partial: Path,
    dest: Path,
    *,
    token: CancelToken,
    on_bytes: Callable[[int], None],
    retries: int = 5,
    backoff_s: float = 1.0,
) -> str:
    """Fetch ``remote`` to ``dest``; returns its sha256. ``on_bytes`` gets bytes on disk."""
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "ab") as out:
            _lock(out, partial)
            try:
                sha = _transfer(hub, remote, out, partial, token, on_bytes, retries, backoff_s)
            except PullCancelled:
                if token.discard_partial:
                    partial.unlink(missing_ok=True)
                raise
            except VerificationFailed:
                partial.unlink(missing_ok=True)  # these bytes are wrong; resuming them is pointless
                raise
            # Still holding the lock, so no other pull can start on these bytes meanwhile.
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise StorageError(f"writing {dest.name} under {dest.parent}: {exc.strerror}") from exc
    return sha


def _transfer(
    hub: HubClient,
    remote: RemoteFile,
    out: BinaryIO,
    partial: Path,
    token: CancelToken,
    on_bytes: Callable[[int], None],
    retries: int,
    backoff_s: float,
) -> str:
    done = os.fstat(out.fileno()).st_size
    if done > remote.size:
        out.truncate(0)
        done = 0
    hasher = _hash_prefix(partial, done, token)
    on_bytes(done)
    failures = 0
    while done < remote.size:
        token.check()
        try:
            with hub.open_body(remote, done) as body:
                if body.offset != done:  # the server ignored Range: start over
                    out.truncate(0)
                    hasher, done = hashlib.sha256(), 0
                    on_bytes(0)
                for chunk in body.chunks:
                    token.check()
                    if done + len(chunk) > remote.size:
                        raise VerificationFailed(
                            f"{remote.filename}: the server sent more than the announced {remote.size} bytes"
                        )
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    failures = 0  # progress resets the retry budget
                    on_bytes(done)
            if done < remote.size:
                raise HubUnavailable(f"{remote.filename}: the body ended at byte {done}")
        except HubUnavailable as exc:
            failures += 1
            if failures > retries:
                raise HubUnavailable(
                    f"{exc} (gave up after {retries} retries at byte {done} of {remote.size};"
                    " pull again to resume from there)"
                ) from exc
            token.sleep(backoff(backoff_s, failures))
            remote = _refresh(hub, remote)
    out.flush()
    os.fsync(out.fileno())
    return _verify(remote, done, hasher.hexdigest())


def _refresh(hub: HubClient, remote: RemoteFile) -> RemoteFile:
    # A CDN location is a signed URL that expires; ask again, pinned to the same commit.
    try:
        fresh = hub.resolve(remote.repo, remote.filename, remote.commit)
    except HubUnavailable:
        return remote  # the next attempt will tell
    if fresh.etag != remote.etag or fresh.size != remote.size:
        raise VerificationFailed(f"{remote.filename} changed on the Hub during the download")
    return fresh


def _verify(remote: RemoteFile, size: int, sha: str) -> str:
    if size != remote.size:
        raise VerificationFailed(f"{remote.filename}: got {size} bytes, expected {remote.size}")
    if remote.sha256 is not None and sha != remote.sha256:
        raise VerificationFailed(
            f"{remote.filename}: sha256 {sha} does not match the Hub's {remote.sha256};"
            " the download was discarded, pull again"
        )
    return sha


def _hash_prefix(partial: Path, size: int, token: CancelToken) -> hashlib._Hash:
    hasher = hashlib.sha256()
    if size:
        with open(partial, "rb") as f:
            remaining = size
            while remaining:
                token.check()
                block = f.read(min(_BLOCK, remaining))
                if not block:
                    raise VerificationFailed(f"{partial} shrank while being read")
                hasher.update(block)
                remaining -= len(block)
    return hasher


def _lock(out: BinaryIO, partial: Path) -> None:
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise PullError(f"another pull is already downloading these bytes ({partial.name})") from exc
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
