"""The supervised backend's settings, taken from the one configuration object: the
restart policy, the liveness bounds and the prompt cache's bound."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from backend.argv import ServerSpec
from backend.liveness import LivenessSettings
from backend.memory import default_cache_ram
from backend.restarts import RestartPolicy
from backend.supervisor import Snapshot, Supervisor
from core.config import Config

log = logging.getLogger("llamagate.backend")


def make_supervisor(spec: ServerSpec, config: Config,
                    on_change: Callable[[Snapshot], None]) -> Supervisor:
    policy = RestartPolicy(max_failures=config.backend_max_restarts,
                           window=config.backend_restart_window)
    liveness = LivenessSettings(hang_seconds=config.backend_hang_seconds,
                                restart_seconds=config.backend_hang_restart_seconds)
    return Supervisor(spec, start_timeout=config.backend_start_timeout,
                      stop_grace=config.backend_stop_grace, policy=policy, liveness=liveness,
                      on_change=on_change)


def cache_ram(config: Config, model: Path | None) -> int:
    """CACHE_RAM, else the bound backend/memory.py derives for `model` (None: router mode,
    where each of MAX_LOADED_MODELS children keeps a cache of its own)."""
    if config.cache_ram is not None:
        return config.cache_ram
    try:
        model_bytes = model.stat().st_size if model is not None else 0
    except OSError:
        model_bytes = 0  # a missing model is reported where it is started
    servers = 1 if model is not None else config.max_loaded_models
    mib = default_cache_ram(model_bytes, servers)
    log.info("llama-server prompt cache: at most %d MiB (--cache-ram; CACHE_RAM unset, derived "
             "from the memory limit)", mib, extra={"cache_ram_mib": mib})
    return mib
