"""The startup banner: what runs where, and loud warnings an operator must see.
Never prints a secret."""

from __future__ import annotations

from pathlib import Path

from llamagate.config import Config
from llamagate.models import ModelChoice


def banner(config: Config, choice: ModelChoice, binary: Path, backend_port: int) -> str:
    lines = [
        "llamagate",
        f"  platform      {config.platform.value}",
        f"  gateway       http://{config.host}:{config.port}/v1  (workers: {config.gateway_workers})",
        f"  health        http://{config.host}:{config.port_health}/ping",
        f"  backend       {binary} on 127.0.0.1:{backend_port}",
        f"  model         {choice.name}  ({choice.path})",
        f"  auth          {'on, keys in ' + str(config.auth_keys_file) if config.auth_enabled else 'OFF'}",
        f"  limits        {config.concurrency_limit} in flight, queue {config.max_queue_size}, "
        f"queue timeout {config.queue_timeout:g}s, request timeout {config.request_timeout:g}s",
    ]
    warnings = []
    if choice.demo:
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
