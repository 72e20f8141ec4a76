"""Finds the llama-server binary: LLAMA_SERVER_PATH, the build cache, then PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


class BinaryNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("LLAMAGATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamagate")
    return Path(base)


def find_llama_server(explicit: Path | None) -> Path:
    if explicit is not None:
        if explicit.is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise BinaryNotFound(f"LLAMA_SERVER_PATH={explicit}: no executable file there")
    builds = sorted(cache_dir().glob("llama-server-*/llama-server"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if builds:
        return builds[0]
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise BinaryNotFound("llama-server not found: run `make llama-server` to build it "
                         "(cached under ~/.cache/llamagate) or set LLAMA_SERVER_PATH")


def version_of(binary: Path) -> str | None:
    """llama-server's build as its /props names it (`b<build>-<commit>`, e.g. b1-0c1e570),
    from `llama-server --version` ("version: … (build 1, commit 0c1e570)"); None when it
    does not answer so."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    found = _BUILD(out.stdout + out.stderr)
    return f"b{found.group(1)}-{found.group(2)}" if found else None


_BUILD = re.compile(r"build (\d+), commit ([0-9a-f]+)").search
