"""The llama-server command line, built from settings (pure: no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSpec:
    binary: Path
    model_path: Path
    alias: str
    port: int
    api_key_file: Path
    ctx: int = 4096
    parallel: int = 4
    ngl: int | None = None
    threads: int | None = None
    sleep_idle_seconds: int = 0
    extra_args: tuple[str, ...] = ()


def build_argv(spec: ServerSpec) -> list[str]:
    """The backend listens on loopback only; its key comes from a file, never argv."""
    argv = [
        str(spec.binary),
        "--model", str(spec.model_path),
        "--alias", spec.alias,
        "--host", "127.0.0.1",
        "--port", str(spec.port),
        "--api-key-file", str(spec.api_key_file),
        "--metrics",
        "--slots",
        "--no-webui",
        "--ctx-size", str(spec.ctx),
        "--parallel", str(spec.parallel),
    ]
    if spec.ngl is not None:
        argv += ["--n-gpu-layers", str(spec.ngl)]
    if spec.threads is not None:
        argv += ["--threads", str(spec.threads)]
    if spec.sleep_idle_seconds > 0:
        argv += ["--sleep-idle-seconds", str(spec.sleep_idle_seconds)]
    argv += list(spec.extra_args)
    return argv
