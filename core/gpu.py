"""GPU name and memory from nvidia-smi; None when there is no NVIDIA GPU."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

_QUERY = "--query-gpu=name,memory.used,memory.total"


def gpu_info() -> list[dict[str, Any]] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, _QUERY, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=2, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append({"name": parts[0], "memory_used_mib": int(parts[1]),
                             "memory_total_mib": int(parts[2])})
            except ValueError:
                continue
    return gpus or None
