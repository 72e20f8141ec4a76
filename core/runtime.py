"""State shared between llamagate's processes through small JSON files.

The serve process and each gateway worker write their state into a private
runtime directory (mode 0700) at least every `HEARTBEAT` seconds; the health
process reads them. A file that stops changing means its writer is stopped or
dead, which is how the health tier tells the truth when the gateway hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.private_files import FILE_MODE

HEARTBEAT = 0.5
SERVE_FILE = "serve.json"
WORKER_PREFIX = "gateway-"


def make_runtime_dir(base: Path | None = None) -> Path:
    """A fresh directory, 0700 (mkdtemp's mode, which no umask widens)."""
    return Path(tempfile.mkdtemp(prefix="llamagate-", dir=base))


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic replace, so a reader never sees half a file; the file is 0600."""
    body = json.dumps({**state, "ts": time.time(), "pid": os.getpid()}).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # a temporary file a killed writer left may be older
        f.write(body)
    os.replace(tmp, path)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_workers(runtime_dir: Path) -> list[dict[str, Any]]:
    """The gateway workers' states. A dead worker's file is skipped: serve removes it when
    it sees the worker die, but one can outlive that (a worker killed while serve was
    stopped, a removal that failed), and it would read as a hung worker for good."""
    states = []
    for path in runtime_dir.glob(f"{WORKER_PREFIX}*.json"):
        state = read_state(path)
        if state is not None and _alive(state.get("pid")):
            states.append(state)
    return states


def forget_worker(runtime_dir: Path, pid: int) -> None:
    """serve's part when a gateway worker dies: its heartbeat (and a temporary file it may
    have been killed while writing) must not be read as a hung worker."""
    for path in (runtime_dir / f"{WORKER_PREFIX}{pid}.json",
                 runtime_dir / f".{WORKER_PREFIX}{pid}.json.{pid}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # not ours to judge: the heartbeat's age still is
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, as another user
        return True
    return True


async def follow(path: Path, on_change: Callable[[dict[str, Any]], None],
                 interval: float = 0.1) -> None:
    """Call `on_change` with the file's state whenever it is rewritten (mtime changes)."""
    last_mtime = 0
    while True:
        with contextlib.suppress(OSError):
            mtime = os.stat(path).st_mtime_ns  # a stat of a tiny local file: not worth a thread
            if mtime != last_mtime:
                last_mtime = mtime
                state = read_state(path)
                if state is not None:
                    on_change(state)
        await asyncio.sleep(interval)  # poll period of a shared file


def write_secret(path: Path, secret: str) -> None:
    """Create a 0600 file holding `secret` (the backend's per-boot key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
