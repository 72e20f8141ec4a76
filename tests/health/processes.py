"""The service's process tree, read from /proc: its children's pids, command lines and
environments, and the runtime directory they share."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (serve's children: health, workers, llama-server...)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the command name in parentheses may hold spaces: the fields follow its ')'
            fields = stat.read_text().rpartition(")")[2].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def runtime_dir(serve_pid: int) -> Path:
    """The runtime directory, from the health process's --runtime-dir."""
    for pid in children(serve_pid):
        argv = cmdline(pid)
        if "health.server" in argv and "--runtime-dir" in argv:
            return Path(argv[argv.index("--runtime-dir") + 1])
    raise AssertionError("no health process under the service")


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus exposition."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))
