"""Tests for llamagate/tiny_model.py (the tiny deterministic llama GGUF writer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader, GGUFValueType, TokenType

from llamagate import tiny_model as mtm


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = mtm.write_model(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=0)
    return path


@pytest.fixture(scope="module")
def reader(model_path: Path) -> GGUFReader:
    return GGUFReader(model_path)


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"missing metadata key {key}"
    return field.contents()


def test_same_seed_is_byte_identical(tmp_path: Path, model_path: Path) -> None:
    again = mtm.write_model(tmp_path / "again.gguf", seed=0)
    assert again.read_bytes() == model_path.read_bytes()


def test_different_seed_differs(tmp_path: Path, model_path: Path) -> None:
    other = mtm.write_model(tmp_path / "other.gguf", seed=1)
    assert other.read_bytes() != model_path.read_bytes()
    assert _field(GGUFReader(other), "general.name") == "llamagate-tiny-s1"


def test_file_size_is_small(model_path: Path) -> None:
    assert 100_000 < model_path.stat().st_size < 1_000_000


def test_creates_parents_and_leaves_no_temp_files(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "tiny.gguf"
    assert mtm.write_model(str(dest), seed=3) == dest
    assert dest.is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.gguf"]


def test_overwrite_replaces_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "tiny.gguf"
    dest.write_bytes(b"not a model")
    mtm.write_model(dest, seed=0)
    assert dest.read_bytes()[:4] == b"GGUF"


def test_rejects_negative_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        mtm.write_model(tmp_path / "x.gguf", seed=-1)
    assert list(tmp_path.iterdir()) == []


def test_general_metadata(reader: GGUFReader) -> None:
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "llamagate-tiny-s0"
    assert _field(reader, "general.file_type") == 1  # MOSTLY_F16


def test_hyperparameters(reader: GGUFReader) -> None:
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.feed_forward_length") == 128
    assert _field(reader, "llama.context_length") == 65536
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_chat_template_is_chatml(reader: GGUFReader) -> None:
    template = _field(reader, "tokenizer.chat_template")
    assert "<|im_start|>" in template
    assert "<|im_end|>" in template
    assert "add_generation_prompt" in template


def test_vocabulary(reader: GGUFReader) -> None:
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    scores: list[float] = _field(reader, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == _field(reader, "llama.vocab_size")
    assert len(set(tokens)) == len(tokens)
    assert 300 < len(tokens) < 1000

    by_text = dict(zip(tokens, types, strict=True))
    byte_tokens = [t for t, ty in by_text.items() if ty == TokenType.BYTE]
    assert sorted(byte_tokens) == sorted(f"<0x{b:02X}>" for b in range(256))
    assert by_text["<|im_start|>"] == TokenType.CONTROL
    assert by_text["<|im_end|>"] == TokenType.CONTROL
    assert by_text["<s>"] == TokenType.CONTROL
    assert by_text["</s>"] == TokenType.CONTROL
    assert by_text["<unk>"] == TokenType.UNKNOWN
    assert by_text["\u2581the"] == TokenType.NORMAL
    assert sum(ty == TokenType.NORMAL for ty in types) >= 200

    assert tokens[_field(reader, "tokenizer.ggml.bos_token_id")] == "<s>"
    assert tokens[_field(reader, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert tokens[_field(reader, "tokenizer.ggml.unknown_token_id")] == "<unk>"
    assert tokens[_field(reader, "tokenizer.ggml.padding_token_id")] == "</s>"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    field = reader.get_field("tokenizer.ggml.add_bos_token")
    assert field is not None and field.types == [GGUFValueType.BOOL]


def test_tensors(reader: GGUFReader) -> None:
    tensors = {t.name: t for t in reader.tensors}
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        for part in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
        ):  # fmt: skip
            expected.add(f"blk.{i}.{part}.weight")
    assert set(tensors) == expected
    # GGUF shapes are (in_features, out_features), i.e. numpy's reversed.
    assert list(tensors["token_embd.weight"].shape) == [64, n_vocab]
    assert list(tensors["output.weight"].shape) == [64, n_vocab]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [128, 64]
    norm = tensors["blk.0.attn_norm.weight"].data
    assert norm.tolist() == [1.0] * 64
    q = tensors["blk.0.attn_q.weight"].data.astype("float32")
    assert 0.01 < float(q.std()) < 0.03


def test_special_tokens_are_suppressed(reader: GGUFReader) -> None:
    """Embedding dim 0 is constant; only special tokens' output rows weigh it (negatively)."""
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors["token_embd.weight"].data.astype("float32")
    out = tensors["output.weight"].data.astype("float32")
    assert (embd[:, 0] > 0).all() and float(embd[:, 0].std()) == 0.0
    special = [mtm.UNK_ID, mtm.BOS_ID, mtm.EOS_S_ID, mtm.IM_START_ID, mtm.IM_END_ID]
    assert (out[special, 0] < 0).all()
    assert int((out[:, 0] != 0).sum()) == len(special)


def test_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "cli" / "m.gguf"
    assert mtm.main([str(dest), "--seed", "7"]) == 0
    assert str(dest) in capsys.readouterr().out
    assert _field(GGUFReader(dest), "general.name") == "llamagate-tiny-s7"
    assert dest.read_bytes() == mtm.write_model(tmp_path / "api.gguf", seed=7).read_bytes()
