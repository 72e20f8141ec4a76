"""Per-model operator overrides, validated and kept in one JSON file under the data dir.

Overrides are keyed by the registry's stable model key (the file's path relative to
MODELS_DIR, without ``.gguf`` and split suffix), not by the display name, so renaming
a model through ``alias`` does not orphan its settings and a rescan keeps them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from backend.models import fields as rules
from backend.models.errors import ValidationError
from backend.models.jsonfile import read_json, write_json_atomic


@dataclass(frozen=True)
class Override:
    """None / empty means "not overridden": the gateway's defaults apply."""

    enabled: bool = True
    alias: str | None = None
    tier: str | None = None
    tags: tuple[str, ...] = ()
    ctx_size: int | None = None
    n_gpu_layers: int | None = None
    parallel: int | None = None
    extra_args: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        data["extra_args"] = list(self.extra_args)
        return data

    def is_default(self) -> bool:
        return self == Override()


_CHECKS: dict[str, Callable[[object], object]] = {
    "enabled": rules.check_bool,
    "alias": rules.check_alias,
    "tier": rules.check_tier,
    "tags": rules.check_tags,
    "ctx_size": rules.check_ctx_size,
    "n_gpu_layers": rules.check_n_gpu_layers,
    "parallel": rules.check_parallel,
    "extra_args": rules.check_extra_args,
}
_DEFAULTS: dict[str, object] = {f.name: getattr(Override(), f.name) for f in fields(Override)}
assert set(_CHECKS) == set(_DEFAULTS), "every Override field needs a check"


def validate_patch(patch: object, base: Override | None = None) -> Override:
    """Apply a partial update to ``base`` (default: no overrides) and return the result.

    A field set to null goes back to its default. Every bad field is reported in one
    ``ValidationError`` naming the field and the accepted form.
    """
    if not isinstance(patch, Mapping):
        raise ValidationError([("(body)", "must be a JSON object of override fields")])
    problems: list[tuple[str, str]] = []
    changes: dict[str, Any] = {}
    for key, value in patch.items():
        check = _CHECKS.get(key) if isinstance(key, str) else None
        if check is None:
            problems.append((str(key), f"unknown field; accepted: {', '.join(_CHECKS)}"))
        elif value is None:
            changes[key] = _DEFAULTS[key]
        else:
            try:
                changes[key] = check(value)
            except rules.BadValue as exc:
                problems.append((key, str(exc)))
    if problems:
        raise ValidationError(problems)
    return replace(base or Override(), **changes)


class OverrideStore:
    """The overrides file. Thread-safe; every change is written atomically before returning."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._items: dict[str, Override] | None = None

    def get(self, key: str) -> Override:
        return self.all().get(key, Override())

    def all(self) -> dict[str, Override]:
        with self._lock:
            return dict(self._load())

    def set(self, key: str, override: Override) -> None:
        with self._lock:
            items = dict(self._load())
            if override.is_default():
                items.pop(key, None)
            else:
                items[key] = override
            write_json_atomic(
                self._path,
                {"version": 1, "models": {k: _stored(v) for k, v in sorted(items.items())}},
            )
            self._items = items

    def _load(self) -> dict[str, Override]:
        if self._items is None:
            self._items = _parse_file(self._path)
        return self._items


def _stored(override: Override) -> dict[str, Any]:
    # Only what differs from the defaults, so the file stays readable by hand.
    return {k: v for k, v in override.to_dict().items() if v != Override().to_dict()[k]}


def _parse_file(path: Path) -> dict[str, Override]:
    # A hand-edited file with mistakes must fail loudly at startup, naming the entry.
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ValidationError([(str(path), f"not valid JSON ({exc})")]) from exc
    if data is None:
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValidationError([(str(path), 'must be {"version": 1, "models": {...}}')])
    items: dict[str, Override] = {}
    problems: list[tuple[str, str]] = []
    for key, patch in models.items():
        try:
            items[key] = validate_patch(patch)
        except ValidationError as exc:
            problems.extend((f"models[{key!r}].{field}", msg) for field, msg in exc.problems)
    if problems:
        raise ValidationError(problems)
    return items
