"""What a pull request means on disk, decided before any byte is fetched. Pure.

- the repo id and the requested name are checked (no ``..``, no absolute paths, no
  hidden components: a pulled file must land inside MODELS_DIR where the registry
  will see it);
- a glob pattern is matched against the repo's file list and must select exactly
  one model (a plain file, or every part of one split set);
- naming one part of a split set pulls all of its parts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from backend.models.errors import BadPullRequest, NotEnoughSpace, RemoteNotFound, UnsafePath
from backend.models.layout import GGUF_SUFFIX, group_files, parse_split

PARTIAL_DIR = ".partial"  # under MODELS_DIR; hidden, so the registry never lists it
_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_HEX_RE = re.compile(r"[0-9a-fA-F]{40,64}")
_GLOB_CHARS = frozenset("*?[")


def check_repo_id(repo: str) -> str:
    if not _REPO_RE.fullmatch(repo) or ".." in repo or repo.endswith((".git", "-", ".")):
        raise BadPullRequest(f"{repo!r} is not a Hugging Face repo id (expected 'owner/name')")
    return repo


def is_pattern(spec: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in spec)


def check_relpath(spec: str) -> str:
    """Return ``spec`` if, used as a path under MODELS_DIR, it stays inside it."""
    problem = None
    if not spec or "\x00" in spec:
        problem = "is empty or contains NUL"
    elif "\\" in spec:
        problem = "contains a backslash"
    elif spec.startswith("/") or re.match(r"^[A-Za-z]:", spec):
        problem = "is an absolute path"
    elif any(part in ("", ".", "..") for part in spec.split("/")):
        problem = "contains '..', '.' or an empty path component"
    elif any(part.startswith(".") for part in spec.split("/")):
        problem = "has a hidden component (starting with '.')"
    if problem:
        raise UnsafePath(f"file name {spec!r} {problem}; it must be a path inside MODELS_DIR")
    return spec


def destination(models_dir: Path, relpath: str) -> Path:
    """Absolute destination of a repo file; refuses paths escaping through symlinks too."""
    check_relpath(relpath)
    root = models_dir.resolve()
    dest = (root / relpath).resolve()
    if not dest.is_relative_to(root) or dest == root:
        raise UnsafePath(f"file name {relpath!r} resolves to {dest}, outside MODELS_DIR {root}")
    return dest


def split_siblings(relpath: str) -> list[str] | None:
    """All part names of the split set ``relpath`` belongs to; None for a plain file."""
    path = PurePosixPath(relpath)
    if not path.name.lower().endswith(GGUF_SUFFIX):
        return None
    split = parse_split(path.name[: -len(GGUF_SUFFIX)])
    if split is None:
        return None
    parent = "" if str(path.parent) == "." else f"{path.parent}/"
    suffix = path.name[-len(GGUF_SUFFIX) :]
    return [f"{parent}{split.base}-{n:05d}-of-{split.count:05d}{suffix}" for n in range(1, split.count + 1)]


def select_files(repo: str, spec: str, repo_files: Sequence[str]) -> list[str]:
    """The repo files a pattern stands for: exactly one model's file(s)."""
    matches = [f for f in repo_files if fnmatch.fnmatchcase(f, spec) and f.lower().endswith(GGUF_SUFFIX)]
    if not matches:
        raise RemoteNotFound(f"no .gguf file in {repo} matches {spec!r}")
    groups = group_files(matches)
    if len(groups) > 1:
        names = ", ".join(g.key for g in groups[:8])
        raise BadPullRequest(f"{spec!r} matches {len(groups)} models in {repo} ({names}); narrow it")
    parts = split_siblings(matches[0])
    if parts is None:
        return matches
    missing = sorted(set(parts) - set(repo_files))
    if missing:
        raise RemoteNotFound(f"{repo} lacks split parts {', '.join(missing)}")
    return parts


def partial_path(models_dir: Path, repo: str, relpath: str, commit: str, etag: str) -> Path:
    """Where the bytes of one remote file accumulate; stable across restarts.

    Named by content (the ETag) so that a restarted pull finds its bytes, and a file
    that changed on the Hub never appends to the old file's bytes.
    """
    if _HEX_RE.fullmatch(etag):
        name = etag.lower()
    else:
        name = hashlib.sha256(f"{repo}/{relpath}@{commit}:{etag}".encode()).hexdigest()
    return models_dir / PARTIAL_DIR / f"{name}.part"


def check_space(free: int, need: int, where: Path) -> None:
    if need > free:
        raise NotEnoughSpace(
            f"needs {format_bytes(need)} more on {where}, only {format_bytes(free)} free;"
            " free some space or point MODELS_DIR at a larger disk"
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
