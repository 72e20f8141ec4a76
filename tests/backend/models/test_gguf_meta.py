from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, LlamaFileType

from backend.models.errors import InvalidGGUF
from backend.models.gguf_meta import read_gguf_info, size_label_for

from .ggufs import write_gguf, write_tiny


def test_reads_the_tiny_model(tmp_path: Path) -> None:
    # The tiny model's shape belongs to llamagate.tiny_model; compare with the file itself.
    path = write_tiny(tmp_path / "tiny.gguf", seed=3)
    reader = GGUFReader(path)
    info = read_gguf_info(path)
    assert info.architecture == "llama"
    assert info.name is not None and info.name.endswith("s3")
    assert info.file_type == "F16"
    assert info.context_length == reader.get_field("llama.context_length").contents()  # type: ignore[union-attr]
    assert info.has_chat_template is True
    assert info.size_label is None
    assert info.parameter_count == sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert info.tensor_count == len(reader.tensors)
    assert info.file_size == path.stat().st_size
    assert info.split_no is None and info.split_count is None


def test_header_fields_and_guessed_file_type(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "q.gguf",
        arch="qwen3",
        name="Qwen3 Tiny",
        size_label="8B",
        context_length=32768,
        tensors={"a": np.zeros((16, 8), np.float16), "n": np.zeros((8,), np.float32)},
    )
    info = read_gguf_info(path)
    assert (info.architecture, info.name, info.size_label) == ("qwen3", "Qwen3 Tiny", "8B")
    assert info.context_length == 32768
    assert info.has_chat_template is False
    assert info.parameter_count == 16 * 8 + 8
    assert info.file_type == "F16"  # no general.file_type: the type of most matrix weights


def test_file_type_from_header(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "q.gguf", file_type=LlamaFileType.MOSTLY_Q4_K_M)
    assert read_gguf_info(path).file_type == "Q4_K_M"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"GG", "truncated"),
        (b"GGUF\x03\x00\x00\x00", "truncated"),
        (b"PK\x03\x04 not a gguf at all, a zip" * 4, "bad magic"),
        (b"GGUF\x63\x00\x00\x00" + b"\x00" * 40, "unsupported GGUF version 99"),
    ],
)
def test_rejects_non_gguf(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(InvalidGGUF, match=reason):
        read_gguf_info(path)


@pytest.mark.parametrize("keep", [24, 100, 5_000, 100_000, -1])
def test_rejects_truncated_model(tmp_path: Path, keep: int) -> None:
    whole = write_tiny(tmp_path / "tiny.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:keep])
    with pytest.raises(InvalidGGUF, match="truncated") as caught:
        read_gguf_info(path)
    assert caught.value.reason == str(caught.value)


def test_corrupt_bytes_never_escape_as_other_errors(tmp_path: Path) -> None:
    whole = bytearray(write_tiny(tmp_path / "tiny.gguf").read_bytes())
    rng = np.random.default_rng(7)
    path = tmp_path / "fuzz.gguf"
    for _ in range(60):
        data = bytearray(whole)
        for index in rng.integers(24, 20_000, size=16):
            data[int(index)] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            read_gguf_info(path)
        except InvalidGGUF:
            pass  # the only acceptable failure


def test_missing_file_is_an_os_error_not_invalid(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_gguf_info(tmp_path / "nope.gguf")


def test_reading_does_not_modify_the_file(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "tiny.gguf")
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    read_gguf_info(path)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


@pytest.mark.parametrize(
    ("count", "label"),
    [(158_400, "158.4K"), (1_500_000_000, "1.5B"), (8_030_000_000, "8B"), (999, "999")],
)
def test_size_label(count: int, label: str) -> None:
    assert size_label_for(count) == label
