"""The llama-server command line, built from settings (pure: no I/O).

Two shapes: one model (`--model`), or router mode (`--models-preset`), where
llama-server starts a child per model itself. Router children cannot take
`--api-key-file` (the router strips it), so in router mode the key travels in the
environment, which the children inherit: every process of the tree then demands it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True)
class ServerSpec:
    binary: Path
    model_path: Path | None
    alias: str | None
    port: int
    api_key_file: Path
    ctx: int = 4096
    parallel: int = 4
    ngl: int | None = None
    threads: int | None = None
    sleep_idle_seconds: int = 0
    extra_args: tuple[str, ...] = ()
    models_preset: Path | None = None  # router mode
    models_max: int = 0
    cache_ram: int | None = None  # MiB of prompt cache (backend/memory.py); None: llama-server's
    in_flight: int = 0  # requests the gateway may send at once (MAX_CONCURRENT_REQUESTS)

    @property
    def router(self) -> bool:
        return self.models_preset is not None


def build_argv(spec: ServerSpec) -> list[str]:
    """The backend listens on loopback only; its key comes from a file, never argv."""
    argv = [str(spec.binary), "--host", "127.0.0.1", "--port", str(spec.port),
            "--metrics", "--slots", "--no-webui"]
    if spec.router:
        # per-model settings (context, slots, GPU layers) live in the preset: command-line
        # values would override every model's
        return argv + ["--models-preset", str(spec.models_preset),
                       "--models-max", str(spec.models_max),
                       "--threads-http", str(http_threads(spec))]
    argv += [
        "--model", str(spec.model_path),
        "--alias", spec.alias or "model",
        "--api-key-file", str(spec.api_key_file),
        "--ctx-size", str(spec.ctx),
        "--parallel", str(spec.parallel),
    ]
    if spec.ngl is not None:
        argv += ["--n-gpu-layers", str(spec.ngl)]
    if spec.threads is not None:
        argv += ["--threads", str(spec.threads)]
    if spec.sleep_idle_seconds > 0:
        argv += ["--sleep-idle-seconds", str(spec.sleep_idle_seconds)]
    if spec.cache_ram is not None:
        argv += ["--cache-ram", str(spec.cache_ram)]
    argv += ["--threads-http", str(http_threads(spec))]
    argv += list(spec.extra_args)
    return argv


def http_threads(spec: ServerSpec) -> int:
    """llama-server's HTTP threads: one per request the gateway may have in flight, and
    HTTP_HEADROOM more. Each request holds a thread until its answer ends, and llama-server's
    own default (parallel + 2, or the cores less one) can be fewer than the gateway sends
    with MAX_CONCURRENT_REQUESTS above PARALLEL: its /health then waited for a stream to
    end, and the liveness probe (backend/liveness.py) read a busy server as a hung one."""
    return max(spec.parallel, spec.in_flight) + HTTP_HEADROOM


# threads beyond the requests in flight: the liveness probe, the gateway's slot-free reads
# (/props, /tokenize, /v1/models), a request cut short whose prompt is being counted
HTTP_HEADROOM: Final = 4


def build_env(spec: ServerSpec) -> dict[str, str]:
    """Environment additions: the key, in router mode only (see the module docstring)."""
    if not spec.router:
        return {}
    return {"LLAMA_API_KEY": spec.api_key_file.read_text().strip()}


def common_options(spec: ServerSpec) -> list[tuple[str, str]]:
    """Router mode: the defaults every model's child gets (the preset's `[*]` section)."""
    options = [("ctx-size", str(spec.ctx)), ("parallel", str(spec.parallel)),
               ("threads-http", str(http_threads(spec)))]
    if spec.ngl is not None:
        options.append(("n-gpu-layers", str(spec.ngl)))
    if spec.threads is not None:
        options.append(("threads", str(spec.threads)))
    if spec.sleep_idle_seconds > 0:
        options.append(("sleep-idle-seconds", str(spec.sleep_idle_seconds)))
    if spec.cache_ram is not None:  # each model's child keeps a cache of its own
        options.append(("cache-ram", str(spec.cache_ram)))
    return options
