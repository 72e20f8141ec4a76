"""What can be told about a model file without loading it: there, a regular file,
readable, and starting with GGUF's magic.

llama-server given a missing or unreadable file exits with status 1 and the reason in
its own log only; the supervisor checks first so that /health's ``last_error`` names
the file (issue 22: a deleted model read as "exited unexpectedly with code 1").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

GGUF_MAGIC: Final = b"GGUF"


def model_problem(path: Path) -> str | None:
    """Why llama-server could not load ``path``, or None when nothing is known against it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"model file not found: {path}"
    except OSError as stat_error:  # a folder on the way not searchable, a dead mount
        return f"model file not readable: {path} ({stat_error.strerror})"
    if not stat.S_ISREG(mode):  # a folder, or a FIFO whose open would block
        return f"model file is not a regular file: {path}"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as open_error:
        return f"model file not readable: {path} ({open_error.strerror})"
    if magic != GGUF_MAGIC:
        return f"model file is not a GGUF file (no GGUF magic at its start): {path}"
    return None
