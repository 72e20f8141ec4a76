"""Write a deterministic, tiny llama-architecture GGUF model for tests.

The model has random weights (numpy, seeded), so its output is gibberish, but it is
a complete, valid llama.cpp model: ``llama-server`` loads it in well under a second,
applies its ChatML chat template, tokenizes arbitrary text and generates thousands of
tokens per second on a CPU. It exists so the gateway's integration tests can run
against a *real* llama-server without downloading anything.

What is in the file:

* Architecture ``llama``: embedding 64, 2 layers, 4 attention heads with 2 KV heads
  (GQA, head dim 16), feed-forward 128, context length 65536 (so tests can run long
  generations), RoPE base 10000, RMS norm epsilon 1e-5. 2-D weights are F16, norm
  vectors F32 (``general.file_type`` = MOSTLY_F16); weights are ``normal * 0.02`` and
  norms are ones, which keeps the logits small, so sampling is numerically stable and picks varied tokens.
* The special tokens (``<unk>``, ``<s>``, ``</s>``, ``<|im_start|>``, ``<|im_end|>``)
  are practically never sampled (logit about -8 against about 0 for the rest), so a
  request generates exactly ``max_tokens`` tokens even without ``ignore_eos``. To get
  a natural stop, force EOS with ``"logit_bias": {"260": 100}``.
* A SentencePiece-style (``tokenizer.ggml.model = "llama"``) vocabulary:
  ``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``
  (type BYTE), the ChatML control tokens ``<|im_start|>``/``<|im_end|>`` (type
  CONTROL), then a few hundred scored pieces (single characters, ``"▁"`` + common
  English words and their prefixes, a few suffixes). Any text tokenizes; whatever
  has no piece falls back to bytes. BOS is ``<s>`` (added to prompts), EOS is
  ``<|im_end|>`` (so ChatML turns end; llama.cpp also treats ``</s>`` as
  end-of-generation), padding is ``</s>``.
* A standard ChatML Jinja template in ``tokenizer.chat_template``.

The same seed always produces a byte-identical file; ``general.name`` records it
(``llamagate-tiny-s<seed>``). The file is written atomically (temporary file in the
target directory, then ``os.replace``), so a concurrent reader never sees a partial
file.

Usage::

    scripts/make_test_model.py PATH [--seed N]

or, from Python::

    from llamagate.tiny_model import write_model
    write_model("/tmp/tiny.gguf", seed=0)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

ARCH = "llama"
NAME_PREFIX = "llamagate-tiny"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Special token ids (fixed, so tests and callers can rely on them).
UNK_ID = 0
BOS_ID = 1
EOS_S_ID = 2  # "</s>"
BYTE_BASE_ID = 3  # "<0x00>" .. "<0xFF>" occupy 3..258
IM_START_ID = BYTE_BASE_ID + 256  # 259
IM_END_ID = IM_START_ID + 1  # 260
EOS_ID = IM_END_ID
PAD_ID = EOS_S_ID
SPECIAL_IDS: tuple[int, ...] = (UNK_ID, BOS_ID, EOS_S_ID, IM_START_ID, IM_END_ID)

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-boundary marker

_WORDS_TEXT = """
    the be to of and a in that have I it for not on with he as you do at this but his by
    from they we say her she or an will my one all would there their what so up out if
    about who get which go me when make can like time no just him know take people into
    year your good some could them see other than then now look only come its over think
    also back after use two how our work first well way even new want because any these
    give day most us is are was were has had hello world yes please thanks model test
    answer question user assistant system The A It This What How Hello Yes No
"""
_WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())
_SUFFIXES: tuple[str, ...] = ("ing", "ed", "er", "es", "ly", "tion", "s", "'s", "n't")
_SINGLE_CHARS: str = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,!?;:'\"-()[]{}/\\*&%$#@+=<>_~`|^"
)


@dataclass(frozen=True)
class Hyperparameters:
    """Shape of the tiny llama model."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 65536
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    init_std: float = 0.02
    # Constant value of embedding dimension 0, and the weight of that dimension in the
    # special tokens' output rows (see _write_gguf): their logits end up around -8.
    embd_const_dim: float = 0.1
    special_logit_weight: float = -2.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


HPARAMS = Hyperparameters()


def _normal_pieces() -> list[str]:
    """Scored vocabulary pieces in a fixed order, without duplicates."""
    pieces: list[str] = [SPIECE_UNDERLINE]
    pieces.extend(_SINGLE_CHARS)
    for word in _WORDS:
        full = SPIECE_UNDERLINE + word
        # Every prefix must be a piece so SentencePiece-style merging reaches the word.
        pieces.extend(full[:n] for n in range(2, len(full) + 1))
    for suffix in _SUFFIXES:
        pieces.extend(suffix[:n] for n in range(2, len(suffix) + 1))
    seen: set[str] = set()
    unique: list[str] = []
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            unique.append(piece)
    return unique


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token types) of the tiny SentencePiece vocabulary."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens.extend(f"<0x{b:02X}>" for b in range(256))
    types.extend([TokenType.BYTE] * 256)
    tokens.extend(["<|im_start|>", "<|im_end|>"])
    types.extend([TokenType.CONTROL, TokenType.CONTROL])
    scores: list[float] = [0.0] * len(tokens)
    assert tokens[IM_START_ID] == "<|im_start|>" and tokens[IM_END_ID] == "<|im_end|>"

    for rank, piece in enumerate(_normal_pieces()):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        # Longer pieces merge first (higher score), then earlier ones.
        scores.append(float(len(piece)) - rank / 1000.0)
    return tokens, scores, [int(t) for t in types]


def _weights(
    rng: np.random.Generator, shape: Sequence[int], std: float
) -> np.ndarray[tuple[int, ...], np.dtype[np.float16]]:
    return (rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)).astype(
        np.float16
    )


def _ones(n: int) -> np.ndarray[tuple[int, ...], np.dtype[np.float32]]:
    return np.ones((n,), dtype=np.float32)


def _write_gguf(path: Path, seed: int, hp: Hyperparameters) -> None:
    tokens, scores, types = build_vocab()
    n_vocab = len(tokens)
    n_embd_kv = hp.head_dim * hp.n_head_kv
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(path, ARCH)
    writer.add_name(f"{NAME_PREFIX}-s{seed}")
    writer.add_description(
        "Tiny random-weight llama model for llamagate tests (output is gibberish)"
    )
    writer.add_file_type(LlamaFileType.MOSTLY_F16)

    writer.add_vocab_size(n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_freq_base)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    # numpy shape is (rows, cols) = (out_features, in_features); GGUF stores it reversed.
    std = hp.init_std
    # Embedding dimension 0 is a constant, so after the final RMS norm it carries a
    # roughly constant positive value; output rows of the special tokens weigh it
    # negatively, which pushes their logits far down (EOS is practically never
    # sampled, so max_tokens is honoured), while other rows ignore it.
    token_embd = _weights(rng, (n_vocab, hp.n_embd), std)
    token_embd[:, 0] = hp.embd_const_dim
    writer.add_tensor("token_embd.weight", token_embd)
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", _ones(hp.n_embd))
        writer.add_tensor(p + "attn_q.weight", _weights(rng, (hp.n_embd, hp.n_embd), std))
        writer.add_tensor(p + "attn_k.weight", _weights(rng, (n_embd_kv, hp.n_embd), std))
        writer.add_tensor(p + "attn_v.weight", _weights(rng, (n_embd_kv, hp.n_embd), std))
        writer.add_tensor(p + "attn_output.weight", _weights(rng, (hp.n_embd, hp.n_embd), std))
        writer.add_tensor(p + "ffn_norm.weight", _ones(hp.n_embd))
        writer.add_tensor(p + "ffn_gate.weight", _weights(rng, (hp.n_ff, hp.n_embd), std))
        writer.add_tensor(p + "ffn_up.weight", _weights(rng, (hp.n_ff, hp.n_embd), std))
        writer.add_tensor(p + "ffn_down.weight", _weights(rng, (hp.n_embd, hp.n_ff), std))
    writer.add_tensor("output_norm.weight", _ones(hp.n_embd))
    output = _weights(rng, (n_vocab, hp.n_embd), std)
    output[:, 0] = 0.0
    output[list(SPECIAL_IDS), 0] = hp.special_logit_weight
    writer.add_tensor("output.weight", output)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_model(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` atomically and return the path.

    Parent directories are created. The same ``seed`` always yields a byte-identical
    file; ``seed`` must be a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_gguf(tmp, seed, HPARAMS)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="llamagate make-test-model",
        description="Write a deterministic tiny random-weight llama GGUF for tests."
    )
    parser.add_argument("path", type=Path, help="output .gguf file")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    try:
        out = write_model(args.path, seed=args.seed)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
