"""Which model file the single-model backend serves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.config import Config

log = logging.getLogger("llamagate.serve")

DEMO_NAME = "llamagate-tiny"


@dataclass(frozen=True)
class ModelChoice:
    name: str
    path: Path
    demo: bool = False


def _name_for(path: Path) -> str:
    return path.name.removesuffix(".gguf")


def choose_model(config: Config) -> ModelChoice:
    """MODEL_PATH, else the only GGUF in MODELS_DIR, else the generated demo model."""
    if config.model_path is not None:
        return ModelChoice(config.model_name or _name_for(config.model_path), config.model_path)
    found = sorted(config.models_dir.glob("*.gguf")) if config.models_dir.is_dir() else []
    if len(found) == 1:
        return ModelChoice(config.model_name or _name_for(found[0]), found[0])
    if len(found) > 1:
        raise ValueError(f"MODELS_DIR={config.models_dir} holds {len(found)} GGUF files; "
                         "set MODEL_PATH to the one to serve")
    from llamagate.tiny_model import write_model

    path = config.data_dir / "demo" / f"{DEMO_NAME}.gguf"
    if not path.is_file():
        write_model(path, seed=0)
    return ModelChoice(config.model_name or DEMO_NAME, path, demo=True)
