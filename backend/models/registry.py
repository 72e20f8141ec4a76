"""The catalogue of models under MODELS_DIR: scanned from disk, merged with overrides.

A scan walks the directory (hidden directories such as the pull partials are
skipped), reads the GGUF header of each new or changed file and reuses the previous
result for files whose (size, mtime_ns) did not change, so a rescan of an unchanged
tree costs one ``stat`` per file. ``scan`` blocks: run it in a worker thread.

Statuses: ``ok``; ``invalid`` (not a readable GGUF, or a broken split set);
``missing`` (the operator configured it, its files are gone: kept so the overrides
are not lost and the admin sees what disappeared).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from backend.models.errors import InvalidGGUF, UnknownModel, ValidationError
from backend.models.gguf_meta import GGUFInfo, read_gguf_info, size_label_for
from backend.models.layout import GGUF_SUFFIX, FileGroup, group_files
from backend.models.overrides import Override, OverrideStore, validate_patch

Status = Literal["ok", "invalid", "missing"]


@dataclass(frozen=True)
class ModelEntry:
    key: str  # stable identity: relative path without .gguf / split suffix
    name: str  # what clients send as "model": the alias, else the file stem
    status: Status
    error: str | None
    parts: tuple[Path, ...]  # files on disk, in part order
    split_count: int
    size: int  # bytes of all parts on disk
    info: GGUFInfo | None  # header of the first part
    parameter_count: int | None  # over all parts
    size_label: str | None
    override: Override

    @property
    def path(self) -> Path | None:
        return self.parts[0] if self.parts else None

    @property
    def servable(self) -> bool:
        return self.status == "ok" and self.override.enabled

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "status": self.status,
            "error": self.error,
            "path": str(self.path) if self.path else None,
            "parts": [str(p) for p in self.parts],
            "split_count": self.split_count,
            "size": self.size,
            "parameter_count": self.parameter_count,
            "size_label": self.size_label,
            "metadata": self.info.to_dict() if self.info else None,
            "override": self.override.to_dict(),
            "servable": self.servable,
        }


@dataclass(frozen=True)
class _FileResult:
    size: int
    mtime_ns: int
    info: GGUFInfo | None
    error: str | None


class ModelRegistry:
    def __init__(
        self,
        models_dir: Path,
        overrides: OverrideStore,
        *,
        reader: Callable[[Path], GGUFInfo] = read_gguf_info,
    ) -> None:
        self._dir = models_dir
        self._overrides = overrides
        self._reader = reader
        self._lock = threading.Lock()
        self._files: dict[str, _FileResult] = {}
        self._groups: list[FileGroup] = []
        self._entries: tuple[ModelEntry, ...] = ()

    def scan(self) -> list[ModelEntry]:
        """Re-read the directory and return the new catalogue."""
        with self._lock:
            previous = self._files
            files: dict[str, _FileResult] = {}
            for rel in _walk_gguf(self._dir):
                result = self._examine(rel, previous.get(rel))
                if result is not None:
                    files[rel] = result
            self._files = files
            self._groups = group_files(files)
            self._entries = self._build()
            return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        """The catalogue of the last scan; no disk access."""
        return list(self._entries)

    def names(self) -> frozenset[str]:
        return frozenset(e.name for e in self._entries)

    def get(self, name: str) -> ModelEntry:
        """Look up by name (alias or stem), falling back to the stable key."""
        entries = self._entries
        for entry in entries:
            if entry.name == name:
                return entry
        for entry in entries:
            if entry.key == name:
                return entry
        raise UnknownModel(name)

    def update(self, name: str, patch: Mapping[str, object]) -> ModelEntry:
        """Validate and persist an override patch for one model; returns the new entry."""
        with self._lock:
            entry = self.get(name)
            override = validate_patch(patch, entry.override)
            if override.alias is not None:
                for other in self._entries:
                    if other.key != entry.key and override.alias in (other.name, other.key):
                        raise ValidationError(
                            [("alias", f"must be unique; {override.alias!r} is {other.key!r}")]
                        )
            self._overrides.set(entry.key, override)
            self._entries = self._build()
            for updated in self._entries:
                if updated.key == entry.key:
                    return updated
            # A missing model whose overrides were all reset is no longer listed.
            return replace(entry, override=override)

    def _examine(self, rel: str, cached: _FileResult | None) -> _FileResult | None:
        path = self._dir / rel
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # removed while we walked
        except OSError as exc:
            return _FileResult(0, 0, None, f"cannot stat: {exc.strerror}")
        if cached is not None and (cached.size, cached.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return cached
        try:
            return _FileResult(st.st_size, st.st_mtime_ns, self._reader(path), None)
        except InvalidGGUF as exc:
            return _FileResult(st.st_size, st.st_mtime_ns, None, exc.reason)
        except OSError as exc:
            return _FileResult(st.st_size, st.st_mtime_ns, None, f"cannot read: {exc.strerror}")

    def _build(self) -> tuple[ModelEntry, ...]:
        overrides = self._overrides.all()
        found = [self._entry(group, overrides.get(group.key, Override())) for group in self._groups]
        keys = {e.key for e in found}
        gone = [_missing(key, o) for key, o in sorted(overrides.items()) if key not in keys]
        return tuple(_assign_names(found + gone))

    def _entry(self, group: FileGroup, override: Override) -> ModelEntry:
        results = [self._files[rel] for rel in group.parts.values()]
        errors = [
            f"{rel}: {r.error}" for rel, r in zip(group.parts.values(), results, strict=True) if r.error
        ]
        error = "; ".join(([group.problem] if group.problem else []) + errors) or None
        first = self._files[group.parts[1]].info if 1 in group.parts else None
        count = None if error else sum(r.info.parameter_count for r in results if r.info)
        label = first.size_label if first and first.size_label else None
        return ModelEntry(
            key=group.key,
            name=group.stem,
            status="invalid" if error else "ok",
            error=error,
            parts=tuple(self._dir / rel for rel in group.parts.values()),
            split_count=group.split_count,
            size=sum(r.size for r in results),
            info=first,
            parameter_count=count,
            size_label=label or (size_label_for(count) if count else None),
            override=override,
        )


def _missing(key: str, override: Override) -> ModelEntry:
    return ModelEntry(
        key=key,
        name=PurePosixPath(key).name,
        status="missing",
        error="no file for this model in MODELS_DIR any more",
        parts=(),
        split_count=1,
        size=0,
        info=None,
        parameter_count=None,
        size_label=None,
        override=override,
    )


def _assign_names(entries: list[ModelEntry]) -> list[ModelEntry]:
    # Aliases win. A stem shared by several files, or taken by an alias, is replaced by
    # the key (which includes the sub-directory) so every name stays addressable.
    aliases = {e.override.alias for e in entries if e.override.alias}
    stems: dict[str, int] = {}
    for e in entries:
        if not e.override.alias:
            stems[e.name] = stems.get(e.name, 0) + 1
    named = []
    for e in entries:
        if e.override.alias:
            name = e.override.alias
        elif stems[e.name] > 1 or e.name in aliases:
            name = e.key
        else:
            name = e.name
        named.append(replace(e, name=name))
    return named


def _walk_gguf(root: Path) -> Iterator[str]:
    """Relative POSIX paths of ``*.gguf`` files, skipping hidden files and directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for filename in sorted(filenames):
            if not filename.startswith(".") and filename.lower().endswith(GGUF_SUFFIX):
                yield (rel_dir / filename).as_posix()
