"""GGUF header metadata, read without touching the weights.

``gguf.GGUFReader`` memory-maps the file and parses only the key/value section and
the tensor infos; tensor data stays unread on disk, so this is cheap even for a
70 GB model (the cost is the Python parsing of the vocabulary arrays, ~1 s for a
150k-token vocabulary, which is why the registry caches results by size and mtime).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from backend.models.errors import InvalidGGUF

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# magic(4) + version(4) + tensor_count(8) + kv_count(8)
HEADER_SIZE = 24

# Everything the reader raises on malformed bytes: short numpy views (IndexError),
# unknown enum values and impossible reshapes (ValueError), duplicate keys (KeyError),
# absurd lengths (OverflowError, MemoryError) and non-UTF-8 names (UnicodeDecodeError).
_PARSE_ERRORS = (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError)


@dataclass(frozen=True)
class GGUFInfo:
    """What the registry and admin API report about one GGUF file."""

    file_size: int
    architecture: str | None
    name: str | None
    size_label: str | None
    parameter_count: int
    file_type: str | None
    context_length: int | None
    has_chat_template: bool
    tensor_count: int
    split_no: int | None
    split_count: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header of ``path``.

    Raises ``InvalidGGUF(reason)`` when the bytes are not a readable GGUF; an
    ``OSError`` (missing file, permission) propagates unchanged.
    """
    file_size = os.stat(path).st_size
    _check_preamble(path, file_size)
    try:
        reader = GGUFReader(path, "r")
        return _info_from_reader(reader, file_size)
    except _PARSE_ERRORS as exc:
        raise InvalidGGUF(f"corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from exc


def _check_preamble(path: Path, file_size: int) -> None:
    # GGUFReader's own messages for these cases are cryptic numpy errors.
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[:4] != GGUF_MAGIC and not (len(head) < 4 and GGUF_MAGIC.startswith(head)):
        raise InvalidGGUF(f"bad magic {head[:4]!r}: not a GGUF file")
    if file_size < HEADER_SIZE:
        raise InvalidGGUF(f"truncated: {file_size} bytes is shorter than a GGUF header")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS and int.from_bytes(head[4:8], "big") not in (SUPPORTED_VERSIONS):
        raise InvalidGGUF(f"unsupported GGUF version {version}")


def _info_from_reader(reader: GGUFReader, file_size: int) -> GGUFInfo:
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    if end > file_size:
        raise InvalidGGUF(f"truncated: tensor data ends at byte {end}, file has {file_size}")
    arch = _str_field(reader, "general.architecture")
    parameter_count = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFInfo(
        file_size=file_size,
        architecture=arch,
        name=_str_field(reader, "general.name"),
        size_label=_str_field(reader, "general.size_label"),
        parameter_count=parameter_count,
        file_type=_file_type(reader),
        context_length=_int_field(reader, f"{arch}.context_length") if arch else None,
        has_chat_template=reader.get_field("tokenizer.chat_template") is not None,
        tensor_count=len(reader.tensors),
        split_no=_int_field(reader, "split.no"),
        split_count=_int_field(reader, "split.count"),
    )


def _str_field(reader: GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _int_field(reader: GGUFReader, key: str) -> int | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def _file_type(reader: GGUFReader) -> str | None:
    code = _int_field(reader, "general.file_type")
    if code is not None:
        try:
            return LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"type-{code}"
    # No header field (older converters): name the type holding most matrix weights.
    weights: Counter[GGMLQuantizationType] = Counter()
    for tensor in reader.tensors:
        if len(tensor.shape) >= 2:
            weights[tensor.tensor_type] += int(tensor.n_elements)
    if not weights:
        return None
    return weights.most_common(1)[0][0].name


def size_label_for(parameter_count: int) -> str:
    """'158K', '1.5B', '8B': the label llama.cpp writes into general.size_label."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameter_count >= scale:
            text = f"{parameter_count / scale:.1f}".removesuffix(".0")
            return text + suffix
    return str(parameter_count)
