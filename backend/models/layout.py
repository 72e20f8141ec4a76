"""How GGUF files on disk form models: plain files and llama.cpp split sets.

Pure: takes relative paths, returns groups. ``gguf-split`` names parts
``<base>-00001-of-00003.gguf`` (1-based, five digits); a split model is one model
whose key is ``<base>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})$")
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class SplitName:
    base: str
    part: int
    count: int


def parse_split(stem: str) -> SplitName | None:
    """'m-00002-of-00003' -> SplitName('m', 2, 3); None for a plain or nonsensical name."""
    match = _SPLIT_RE.match(stem)
    if match is None:
        return None
    part, count = int(match["no"]), int(match["count"])
    if not 1 <= part <= count:
        return None
    return SplitName(match["base"], part, count)


@dataclass(frozen=True)
class FileGroup:
    """One model's files. ``parts`` maps part number (1 for a plain file) to relpath."""

    key: str
    parts: dict[int, str]
    split_count: int
    problem: str | None

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).name


def group_files(relpaths: Iterable[str]) -> list[FileGroup]:
    """Group ``.gguf`` relative paths (POSIX separators) into models, sorted by key."""
    plain: dict[str, str] = {}
    splits: dict[str, dict[int, str]] = {}
    counts: dict[str, set[int]] = {}
    for rel in relpaths:
        path = PurePosixPath(rel)
        stem = path.name[: -len(GGUF_SUFFIX)]
        split = parse_split(stem)
        if split is None:
            plain[str(path.parent / stem)] = rel
            continue
        key = str(path.parent / split.base)
        splits.setdefault(key, {})[split.part] = rel
        counts.setdefault(key, set()).add(split.count)
    # 'm.gguf' next to 'm-00001-of-00002.gguf' would be two models with one key: keep
    # the split set, flagged, and leave the plain file out until the operator chooses.
    groups = [FileGroup(key, {1: rel}, 1, None) for key, rel in plain.items() if key not in splits]
    for key, parts in splits.items():
        groups.append(_split_group(key, parts, counts[key], clash=key in plain))
    return sorted(groups, key=lambda g: g.key)


def _split_group(key: str, parts: dict[int, str], counts: set[int], clash: bool) -> FileGroup:
    count = max(counts)
    problem: str | None = None
    if len(counts) > 1:
        problem = f"parts disagree on the part count ({', '.join(map(str, sorted(counts)))})"
    else:
        missing = [n for n in range(1, count + 1) if n not in parts]
        if missing:
            problem = f"missing split parts {', '.join(map(str, missing))} of {count}"
    if clash:
        problem = f"both {key}{GGUF_SUFFIX} and split parts of {key} exist"
    return FileGroup(key, dict(sorted(parts.items())), count, problem)
