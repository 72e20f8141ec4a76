"""Pure operations on a set of keys: each takes the current keys and returns the new ones.

They are what ``KeyStore.update`` applies under the file lock; keeping them free of I/O lets the
CLI and a future admin endpoint share them and lets tests run them without a file.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from keys.codec import check_unique
from keys.errors import DuplicateKeyError, KeyFormatError, UnknownKeyError
from keys.hashing import display_prefix, hash_secret, new_key_id, new_secret
from keys.legacy import LegacyEntry
from keys.model import ApiKey, Limits, PreviousSecret

KeySet = tuple[ApiKey, ...]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What the caller chooses about a new key."""

    name: str
    scopes: frozenset[str]
    expires: float | None = None
    limits: Limits = Limits()
    models: frozenset[str] | None = None


def find(keys: Iterable[ApiKey], key_id: str) -> ApiKey:
    """Return the key with this id or raise UnknownKeyError."""
    for key in keys:
        if key.id == key_id:
            return key
    raise UnknownKeyError(key_id)


def generate(
    keys: KeySet,
    spec: KeySpec,
    now: float,
    *,
    make_secret: Callable[[], str] = new_secret,
    make_id: Callable[[], str] = new_key_id,
) -> tuple[KeySet, tuple[ApiKey, str]]:
    """Add a new key; the result carries the key and its plaintext secret (shown once)."""
    taken = {k.id for k in keys}
    key_id = make_id()
    while key_id in taken:
        key_id = make_id()
    secret = make_secret()
    key = ApiKey(
        id=key_id,
        name=spec.name,
        secret_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        scopes=spec.scopes,
        created=now,
        expires=spec.expires,
        limits=spec.limits,
        models=spec.models,
    )
    return (*keys, key), (key, secret)


def remove(keys: KeySet, key_id: str) -> tuple[KeySet, ApiKey]:
    """Drop a key; returns the removed record."""
    key = find(keys, key_id)
    return tuple(k for k in keys if k.id != key_id), key


def set_disabled(keys: KeySet, key_id: str, disabled: bool) -> tuple[KeySet, ApiKey]:
    """Disable or enable a key; returns the updated record."""
    key = replace(find(keys, key_id), disabled=disabled)
    return _put(keys, key), key


def rotate(
    keys: KeySet,
    key_id: str,
    now: float,
    grace: float,
    *,
    make_secret: Callable[[], str] = new_secret,
) -> tuple[KeySet, tuple[ApiKey, str]]:
    """Give a key a new secret; the old one keeps working for ``grace`` seconds (0: not at all).

    Previous secrets whose grace has already ended are dropped on the way.
    """
    key = find(keys, key_id)
    secret = make_secret()
    previous = [p for p in key.previous if p.valid_until > now]
    if grace > 0:
        previous.append(PreviousSecret(key.secret_hash, now + grace))
    new_key = replace(
        key,
        secret_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        previous=tuple(previous),
    )
    return _put(keys, new_key), (new_key, secret)


def import_legacy(
    keys: KeySet, entries: Iterable[LegacyEntry], scopes: frozenset[str], now: float
) -> tuple[KeySet, tuple[ApiKey, ...]]:
    """Add legacy keys under their old ids; their secrets are hashed and keep authenticating.

    All or nothing: a clash with an existing id or secret raises DuplicateKeyError naming it.
    """
    by_id = {k.id for k in keys}
    added: list[ApiKey] = []
    for entry in entries:
        if entry.key_id in by_id:
            raise DuplicateKeyError(f"line {entry.line_no}: key id {entry.key_id!r} already exists")
        added.append(
            ApiKey(
                id=entry.key_id,
                name=entry.key_id,
                secret_hash=hash_secret(entry.secret),
                prefix=display_prefix(entry.secret),
                scopes=scopes,
                created=now,
            )
        )
    new_keys = (*keys, *added)
    try:
        check_unique(new_keys)
    except KeyFormatError as exc:
        raise DuplicateKeyError(str(exc)) from None
    return new_keys, tuple(added)


def _put(keys: KeySet, key: ApiKey) -> KeySet:
    return tuple(key if k.id == key.id else k for k in keys)
