"""`llamagate pull REPO FILE`: download a GGUF from the Hugging Face Hub in the foreground.

Uses the same code path as the server's pull jobs (``backend.models.puller``): a
disk-space check before the first byte, resume from the partial file of an earlier
interrupted run, sha256 verification against the Hub's LFS hash. Ctrl-C keeps the
partial file; running the same command again continues from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from backend.models.download import CancelToken
from backend.models.errors import PullError
from backend.models.hub import HubClient
from backend.models.puller import PullProgress, run_pull
from core.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamagate pull",
        description="Download a GGUF model from the Hugging Face Hub into MODELS_DIR.",
    )
    parser.add_argument("repo", help="Hub repo id, e.g. Qwen/Qwen3-8B-GGUF")
    parser.add_argument(
        "file",
        help="file in the repo, or a glob selecting one model such as '*Q4_K_M*.gguf';"
        " naming one part of a split model pulls all parts",
    )
    parser.add_argument("--revision", default="main", help="branch, tag or commit (main)")
    parser.add_argument("--models-dir", type=Path, default=None, help="destination (default: MODELS_DIR)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one pull; returns 0 on success, 1 if the pull failed, 2 on bad usage, 130 on ^C."""
    args = _parser().parse_args(argv)
    models_dir: Path | None = args.models_dir
    if models_dir is None:
        try:
            models_dir = load_config(os.environ).models_dir
        except ConfigError as exc:
            print(f"llamagate pull: {exc}", file=sys.stderr)
            return 2
    bars: list[tqdm[None]] = []  # created once the size is known, starting at resumed bytes

    def show(done: int, total: int | None) -> None:
        if total is None or args.quiet:
            return
        if not bars:
            bars.append(
                tqdm(
                    desc=args.file,
                    total=total,
                    initial=done,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                )
            )
        bars[0].update(done - bars[0].n)

    try:
        result = run_pull(
            HubClient(args.endpoint),
            models_dir,
            args.repo,
            args.file,
            args.revision,
            token=CancelToken(),
            progress=PullProgress(show),
        )
    except PullError as exc:
        _close(bars)
        print(f"llamagate pull: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close(bars)
        print("llamagate pull: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    _close(bars)
    for path, sha in zip(result.paths, result.sha256, strict=True):
        print(f"{path}  sha256={sha}")
    return 0


def _close(bars: list[tqdm[None]]) -> None:
    for bar in bars:
        bar.close()
