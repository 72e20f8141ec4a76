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

HEARTBEAT = 0.5
SERVE_FILE = "serve.json"
WORKER_PREFIX = "gateway-"


def make_runtime_dir(base: Path | None = None) -> Path:
    return Path(tempfile.mkdtemp(prefix="llamagate-", dir=base))


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    body = json.dumps({**state, "ts": time.time(), "pid": os.getpid()}).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
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
    states = []
    for path in runtime_dir.glob(f"{WORKER_PREFIX}*.json"):
        state = read_state(path)
        if state is not None:
            states.append(state)
    return states


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
