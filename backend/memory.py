"""The default bound of llama-server's prompt cache (``--cache-ram``), from the memory
this process may use.

llama-server keeps the prompts of finished requests in host memory, up to
``--cache-ram`` MiB (8192 by default), so its RSS grows under traffic until it reaches
that (issue 22: 18.8 MB to 190 MB in ten minutes with the tiny model, ~17 MB/min). In a
container whose memory limit is below what the model, its context and 8 GiB of cache
need, the kernel would kill it for its own cache. The default is therefore derived from
the tightest of the cgroup's limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, on
this process's cgroup and its ancestors) and physical memory: the smaller of a quarter
of it and half of what the model's weights leave (the rest is the KV cache, compute
buffers and llamagate's own processes), and never above llama-server's own 8192 MiB.
The root is injected so tests read fake cgroup and /proc files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

MIB: Final = 1024 * 1024
LLAMA_SERVER_DEFAULT_MIB: Final = 8192
# cgroup v1's "no limit" is the largest page-aligned 64-bit value; anything this large is none
NO_LIMIT: Final = 1 << 60
CGROUP_ROOT: Final = "sys/fs/cgroup"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit at this level
        return None
    value = int(text)
    return value if value < NO_LIMIT else None


def _own_cgroups(root: Path) -> list[tuple[str, str]]:
    """(controllers, path) of each line of /proc/self/cgroup."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            found.append((parts[1], parts[2]))
    return found


def _tightest(mount: Path, cgroup: str, name: str) -> int | None:
    """The smallest limit in `name` from this cgroup's folder up to the mount (a limit
    on an ancestor binds too). In a container with its own cgroup namespace the path is
    "/" and the mount is the container's own cgroup."""
    folder = mount / cgroup.lstrip("/")
    if not folder.is_dir():
        folder = mount  # a path from outside our namespace: the mount is ours
    limits = []
    while True:
        value = _read_int(folder / name)
        if value is not None:
            limits.append(value)
        if folder == mount:
            break
        folder = folder.parent
    return min(limits) if limits else None


def memory_limit(root: Path = Path("/")) -> int | None:
    """This process's cgroup memory limit in bytes (v2, else v1); None without one."""
    limits = []
    for controllers, cgroup in _own_cgroups(root):
        if controllers == "":  # the v2 unified hierarchy
            limit = _tightest(root / CGROUP_ROOT, cgroup, "memory.max")
        elif "memory" in controllers.split(","):
            limit = _tightest(root / CGROUP_ROOT / "memory", cgroup, "memory.limit_in_bytes")
        else:
            continue
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def physical_memory(root: Path = Path("/")) -> int | None:
    """MemTotal of /proc/meminfo, in bytes."""
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemTotal:"):
            words = line.split()
            if len(words) >= 2 and words[1].isdigit():
                return int(words[1]) * 1024  # kB
    return None


def default_cache_ram(model_bytes: int, servers: int = 1, root: Path = Path("/")) -> int:
    """``--cache-ram`` in MiB for `servers` llama-servers (router mode: one per loaded
    model, each with its own cache) sharing the memory with `model_bytes` of weights."""
    known = [m for m in (memory_limit(root), physical_memory(root)) if m is not None]
    if not known:
        return LLAMA_SERVER_DEFAULT_MIB  # nothing to go by: llama-server's own bound
    memory = min(known)
    room = min(memory // 4, (memory - model_bytes) // 2) // max(1, servers)
    return max(0, min(LLAMA_SERVER_DEFAULT_MIB, room // MIB))
