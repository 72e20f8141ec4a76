"""GGUF files for tests: the project's tiny real model, and hand-made variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType

from llamagate.tiny_model import write_model


def write_tiny(path: Path, seed: int = 0) -> Path:
    """The tiny llama model llama-server can load (``llamagate make-test-model``)."""
    return write_model(path, seed=seed)


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str | None = "custom",
    size_label: str | None = None,
    context_length: int | None = 4096,
    chat_template: bool = False,
    file_type: LlamaFileType | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    split: tuple[int, int] | None = None,
) -> Path:
    """A small GGUF with exactly the header fields asked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, arch)
    if name is not None:
        writer.add_name(name)
    if size_label is not None:
        writer.add_size_label(size_label)
    if context_length is not None:
        writer.add_context_length(context_length)
    if chat_template:
        writer.add_chat_template("{{ messages }}")
    if file_type is not None:
        writer.add_file_type(file_type)
    if split is not None:
        writer.add_uint16("split.no", split[0] - 1)  # 0-based on disk, as gguf-split writes
        writer.add_uint16("split.count", split[1])
    for tensor_name, array in (tensors or {"w": np.zeros((8, 4), np.float32)}).items():
        writer.add_tensor(tensor_name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
