"""The boot diagnostics: what runs where, with which versions, and loud warnings
an operator must see. Printed once and logged once. Never shows a secret."""

from __future__ import annotations

import platform as py_platform
from importlib import metadata
from typing import Any

from core.config import Config
from core.gpu import gpu_info


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def key_count(config: Config) -> str:
    if not config.auth_enabled:
        return "auth off"
    from keys.store import read_keys_file  # only the count is read; no secret is kept

    if not config.auth_keys_file.is_file():
        return "0 (no key file)"
    try:
        return str(len(read_keys_file(config.auth_keys_file)))
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__})"


def diagnostics(config: Config, model: str, backend: str) -> dict[str, Any]:
    gpus = gpu_info()
    return {
        "platform": config.platform.value,
        "gpus": [f"{g['name']} ({g['memory_used_mib']}/{g['memory_total_mib']} MiB)" for g in gpus]
        if gpus else "none",
        "gateway": f"http://{config.host}:{config.port}/v1 (workers: {config.gateway_workers})",
        "health": f"http://{config.host}:{config.port_health}/ping",
        "backend": backend,
        "model": model,
        "auth": f"on, keys: {key_count(config)} in {config.auth_keys_file}" if config.auth_enabled
        else "OFF",
        "limits": f"{config.concurrency_limit} in flight, queue {config.max_queue_size}, queue timeout "
                  f"{config.queue_timeout:g}s, request timeout {config.request_timeout:g}s",
        "versions": f"llamagate {_version('llamagate')}, python {py_platform.python_version()}, "
                    f"aiohttp {_version('aiohttp')}",
        "data_dir": str(config.data_dir),
    }


def banner(info: dict[str, Any], config: Config, demo: bool) -> str:
    lines = ["llamagate"] + [f"  {k:<13} {v}" for k, v in info.items()]
    warnings = []
    if demo:
        warnings += [
            "SERVING THE DEMO MODEL: a tiny random-weight model generated for tests; its output is",
            "gibberish. Point llamagate at a real GGUF with MODEL_PATH=/path/to/model.gguf, or put",
            "one GGUF file in MODELS_DIR.",
        ]
    if not config.auth_enabled:
        warnings.append("AUTH IS DISABLED (AUTH_ENABLED=false): anyone who can reach the port can use it.")
    elif not config.auth_keys_file.is_file():
        warnings += [f"No key file at {config.auth_keys_file}: no API key works yet. Create one with",
                     "  python scripts/key_mgmt.py generate --name me"]
    if warnings:
        bar = "!" * 78
        lines += [bar] + [f"! {w}" for w in warnings] + [bar]
    return "\n".join(lines)
