"""One pull, start to finish, in the calling thread: plan, check, download, verify.

Shared by the server's ``PullManager`` (which runs it in a worker thread) and the
``llamagate pull`` command (which runs it in the foreground).
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from backend.models import plan
from backend.models.download import CancelToken, backoff, download_file
from backend.models.errors import DestinationExists, HubUnavailable, StorageError
from backend.models.hub import HubClient, RemoteFile
from backend.models.sha256_cache import hash_file

T = TypeVar("T")

FreeSpace = Callable[[Path], int]


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class PullResult:
    files: tuple[RemoteFile, ...]
    paths: tuple[Path, ...]
    sha256: tuple[str, ...]
    bytes_fetched: int  # 0 when everything was already in place


class PullProgress:
    """Byte counters written by the pull thread and read by anyone."""

    def __init__(self, listener: Callable[[int, int | None], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._listener = listener
        self._files: tuple[str, ...] = ()
        self._per_file: list[int] = []
        self._total: int | None = None

    def planned(self, files: tuple[str, ...], sizes: list[int]) -> None:
        with self._lock:
            self._files = files
            self._per_file = [0] * len(sizes)
            self._total = sum(sizes)
        self._notify()

    def file_bytes(self, index: int, done: int) -> None:
        with self._lock:
            self._per_file[index] = done
        self._notify()

    def snapshot(self) -> tuple[int, int | None, tuple[str, ...]]:
        """(bytes done, bytes total or None before planning, repo files)."""
        with self._lock:
            return sum(self._per_file), self._total, self._files

    def _notify(self) -> None:
        if self._listener is not None:
            done, total, _ = self.snapshot()
            self._listener(done, total)


def run_pull(
    hub: HubClient,
    models_dir: Path,
    repo: str,
    spec: str,
    revision: str,
    *,
    token: CancelToken,
    progress: PullProgress,
    free_space: FreeSpace = disk_free,
    retries: int = 5,
    backoff_s: float = 1.0,
) -> PullResult:
    """Pull ``spec`` (a file name or glob) of ``repo`` at ``revision`` into ``models_dir``."""
    plan.check_repo_id(repo)
    plan.check_relpath(spec)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create MODELS_DIR {models_dir}: {exc.strerror}") from exc
    def retrying(step: Callable[[], T]) -> T:
        return _retrying(step, token, retries, backoff_s)

    names = retrying(lambda: _names(hub, repo, spec, revision))
    first = retrying(lambda: hub.resolve(repo, names[0], revision))
    # Pin the other parts to the commit the first one came from.
    remotes = [first, *(retrying(functools.partial(hub.resolve, repo, n, first.commit))
                        for n in names[1:])]
    dests = [plan.destination(models_dir, r.filename) for r in remotes]
    partials = [plan.partial_path(models_dir, repo, r.filename, r.commit, r.etag) for r in remotes]
    progress.planned(tuple(names), [r.size for r in remotes])

    present = [_already_there(r, d, token) for r, d in zip(remotes, dests, strict=True)]
    need = sum(r.size - _size(p) for r, p, ok in zip(remotes, partials, present, strict=True) if not ok)
    plan.check_space(free_space(models_dir), need, models_dir)

    shas: list[str] = []
    fetched = 0
    for i, (remote, dest, partial, ok) in enumerate(zip(remotes, dests, partials, present, strict=True)):
        if ok is not None:
            shas.append(ok)
            progress.file_bytes(i, remote.size)
            continue
        start = _size(partial)
        shas.append(
            download_file(
                hub,
                remote,
                partial,
                dest,
                token=token,
                on_bytes=functools.partial(progress.file_bytes, i),
                retries=retries,
                backoff_s=backoff_s,
            )
        )
        fetched += remote.size - min(start, remote.size)
    return PullResult(tuple(remotes), tuple(dests), tuple(shas), fetched)


def _retrying(step: Callable[[], T], token: CancelToken, retries: int, backoff_s: float) -> T:
    """A Hub metadata request, tried again after a network failure as a download is: a
    Hub that is down for a moment must not fail a pull before its first byte."""
    failures = 0
    while True:
        token.check()
        try:
            return step()
        except HubUnavailable:
            failures += 1
            if failures > retries:
                raise
            token.sleep(backoff(backoff_s, failures))


def _names(hub: HubClient, repo: str, spec: str, revision: str) -> list[str]:
    if plan.is_pattern(spec):
        names = plan.select_files(repo, spec, hub.list_files(repo, revision))
    else:
        names = plan.split_siblings(spec) or [spec]
    for name in names:
        plan.check_relpath(name)
    return names


def _already_there(remote: RemoteFile, dest: Path, token: CancelToken) -> str | None:
    """The sha256 of ``dest`` if it already holds exactly this file; raises if it holds another."""
    try:
        size = dest.stat().st_size
    except FileNotFoundError:
        return None
    if size == remote.size:
        token.check()
        sha = hash_file(dest)
        if remote.sha256 is None or sha == remote.sha256:
            return sha
    raise DestinationExists(
        f"{dest} already exists with different content; move it away or delete it, then pull again"
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
