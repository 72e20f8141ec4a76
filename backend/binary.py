"""Finds the llama-server binary: LLAMA_SERVER_PATH, the build cache, then PATH."""

from __future__ import annotations

import os
import shutil
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
