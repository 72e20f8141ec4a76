"""JSON form of the keys file: ``{"version": 1, "keys": [...]}``.

Parsing is strict: unknown fields are rejected rather than ignored, because a misspelt
``"disabeld": true`` silently leaving a key enabled is worse than a reload that fails loudly and
keeps the last good set.
"""

import json
import math
from collections.abc import Iterable, Mapping
from typing import Final

from keys.errors import KeyFormatError
from keys.model import ApiKey, Limits, PreviousSecret

FORMAT_VERSION: Final = 1
_KEY_FIELDS: Final = frozenset(
    {
        "id",
        "name",
        "hash",
        "prefix",
        "scopes",
        "created",
        "expires",
        "disabled",
        "limits",
        "models",
        "previous",
    }
)
_LIMIT_FIELDS: Final = ("requests_per_minute", "tokens_per_minute", "max_concurrent")


def key_to_dict(key: ApiKey) -> dict[str, object]:
    """Return the JSON-ready form of one key."""
    return {
        "id": key.id,
        "name": key.name,
        "hash": key.secret_hash,
        "prefix": key.prefix,
        "scopes": sorted(key.scopes),
        "created": key.created,
        "expires": key.expires,
        "disabled": key.disabled,
        "limits": {name: getattr(key.limits, name) for name in _LIMIT_FIELDS},
        "models": None if key.models is None else sorted(key.models),
        "previous": [{"hash": p.secret_hash, "valid_until": p.valid_until} for p in key.previous],
    }


def key_from_dict(raw: object, where: str) -> ApiKey:
    """Build a key from its JSON form; ``where`` names the record in error messages."""
    d = _mapping(raw, where)
    unknown = set(d) - _KEY_FIELDS
    if unknown:
        raise KeyFormatError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    limits = _mapping(d.get("limits", {}), f"{where}.limits")
    unknown = set(limits) - set(_LIMIT_FIELDS)
    if unknown:
        raise KeyFormatError(f"{where}.limits: unknown field(s) {', '.join(sorted(unknown))}")
    models = d.get("models")
    previous = d.get("previous", [])
    if not isinstance(previous, list):
        raise KeyFormatError(f"{where}.previous: expected a list")
    return ApiKey(
        id=_str(d, "id", where),
        name=_str(d, "name", where),
        secret_hash=_str(d, "hash", where),
        prefix=_str(d, "prefix", where),
        scopes=frozenset(_str_list(d.get("scopes"), f"{where}.scopes")),
        created=_number(d.get("created"), f"{where}.created"),
        expires=_opt_number(d.get("expires"), f"{where}.expires"),
        disabled=_bool(d.get("disabled", False), f"{where}.disabled"),
        limits=Limits(**{n: _opt_int(limits.get(n), f"{where}.limits.{n}") for n in _LIMIT_FIELDS}),
        models=None if models is None else frozenset(_str_list(models, f"{where}.models")),
        previous=tuple(_previous(p, f"{where}.previous[{i}]") for i, p in enumerate(previous)),
    )


def dump_keys(keys: Iterable[ApiKey]) -> str:
    """Serialise keys into the versioned document, one stable, diff-friendly layout."""
    doc = {"version": FORMAT_VERSION, "keys": [key_to_dict(k) for k in keys]}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def parse_keys(text: str) -> tuple[ApiKey, ...]:
    """Parse the keys document; ids and secret hashes must be unique across all keys."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # The decoder's message gives a position only, never the surrounding text.
        raise KeyFormatError(f"not valid JSON: {exc}") from None
    top = _mapping(doc, "document")
    if top.get("version") != FORMAT_VERSION:
        raise KeyFormatError(f"unsupported keys file version {top.get('version')!r}")
    raw_keys = top.get("keys")
    if not isinstance(raw_keys, list):
        raise KeyFormatError("document: 'keys' must be a list")
    keys = tuple(key_from_dict(raw, f"keys[{i}]") for i, raw in enumerate(raw_keys))
    check_unique(keys)
    return keys


def check_unique(keys: Iterable[ApiKey]) -> None:
    """Raise if two keys share an id or any secret hash (current or previous)."""
    ids: set[str] = set()
    hashes: dict[str, str] = {}
    for key in keys:
        if key.id in ids:
            raise KeyFormatError(f"duplicate key id {key.id!r}")
        ids.add(key.id)
        for h in key.all_hashes():
            if h in hashes:
                raise KeyFormatError(f"keys {hashes[h]!r} and {key.id!r} share a secret")
            hashes[h] = key.id


def _previous(raw: object, where: str) -> PreviousSecret:
    d = _mapping(raw, where)
    if set(d) != {"hash", "valid_until"}:
        raise KeyFormatError(f"{where}: expected exactly 'hash' and 'valid_until'")
    return PreviousSecret(_str(d, "hash", where), _number(d["valid_until"], f"{where}.valid_until"))


def _mapping(raw: object, where: str) -> Mapping[str, object]:
    if not isinstance(raw, dict):
        raise KeyFormatError(f"{where}: expected an object")
    return raw


def _str(d: Mapping[str, object], name: str, where: str) -> str:
    value = d.get(name)
    if not isinstance(value, str):
        raise KeyFormatError(f"{where}.{name}: expected a string")
    return value


def _str_list(raw: object, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise KeyFormatError(f"{where}: expected a list of strings")
    return raw


def _number(raw: object, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise KeyFormatError(f"{where}: expected a finite number")
    return float(raw)


def _opt_number(raw: object, where: str) -> float | None:
    return None if raw is None else _number(raw, where)


def _opt_int(raw: object, where: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise KeyFormatError(f"{where}: expected an integer or null")
    return raw


def _bool(raw: object, where: str) -> bool:
    if not isinstance(raw, bool):
        raise KeyFormatError(f"{where}: expected true or false")
    return raw
