"""Workers' heartbeat files: a dead worker's is not read, and serve can forget it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from core import runtime


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _heartbeat(rdir: Path, pid: int) -> None:
    """A fresh heartbeat, as worker `pid` writes it (runtime.write_state adds our pid)."""
    state = {"in_flight": 1, "ts": time.time(), "pid": pid}
    (rdir / f"{runtime.WORKER_PREFIX}{pid}.json").write_text(json.dumps(state))


def test_a_dead_workers_heartbeat_is_not_read(tmp_path: Path) -> None:
    dead = _dead_pid()
    _heartbeat(tmp_path, dead)
    _heartbeat(tmp_path, os.getpid())
    assert [w["pid"] for w in runtime.read_workers(tmp_path)] == [os.getpid()]


def test_forget_worker_removes_its_heartbeat_and_a_half_written_one(tmp_path: Path) -> None:
    dead = _dead_pid()
    _heartbeat(tmp_path, dead)
    tmp = tmp_path / f".{runtime.WORKER_PREFIX}{dead}.json.{dead}.tmp"
    tmp.write_text("{")
    kept = tmp_path / f"{runtime.WORKER_PREFIX}{os.getpid()}.json"
    runtime.write_state(kept, {})
    runtime.forget_worker(tmp_path, dead)
    runtime.forget_worker(tmp_path, dead)  # twice: nothing left to remove is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
