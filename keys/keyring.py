"""Authentication against an immutable snapshot of the keys.

``Keyring.authenticate`` runs on every request, so it does one SHA-256 of the presented secret and
one dict lookup; ``hmac.compare_digest`` then confirms the match. Looking up by hash leaks nothing
useful through timing: an attacker learns at most whether the hash of their guess is stored.
"""

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from keys.codec import check_unique
from keys.hashing import hash_secret, hashes_equal
from keys.model import ApiKey


class AuthFailure(enum.Enum):
    """Why a request was not authenticated."""

    MISSING = "missing"  # no secret was presented
    INVALID = "invalid"  # unknown secret, or a rotated-out secret past its grace period
    EXPIRED = "expired"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of ``Keyring.authenticate``: a key, or the reason there is none."""

    key: ApiKey | None
    reason: AuthFailure | None
    # True when the secret was a rotated-out one still inside its grace period.
    via_previous_secret: bool = False

    @property
    def ok(self) -> bool:
        return self.key is not None


class _Entry(NamedTuple):
    key: ApiKey
    stored_hash: str
    deadline: float | None  # None for the current secret, else the end of the grace period


_MISSING = AuthResult(None, AuthFailure.MISSING)
_INVALID = AuthResult(None, AuthFailure.INVALID)


class Keyring:
    """Read-only view of a set of keys, indexed by secret hash and by id."""

    __slots__ = ("_by_hash", "_by_id")

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        keys = tuple(keys)
        check_unique(keys)
        by_hash: dict[str, _Entry] = {}
        for key in keys:
            by_hash[key.secret_hash] = _Entry(key, key.secret_hash, None)
            for prev in key.previous:
                by_hash[prev.secret_hash] = _Entry(key, prev.secret_hash, prev.valid_until)
        self._by_hash: Mapping[str, _Entry] = MappingProxyType(by_hash)
        self._by_id: Mapping[str, ApiKey] = MappingProxyType({k.id: k for k in keys})

    def authenticate(self, secret: str | None, now: float) -> AuthResult:
        """Return the key this secret belongs to, or why it is refused, at time ``now``."""
        if not secret:
            return _MISSING
        presented = hash_secret(secret)
        entry = self._by_hash.get(presented)
        if entry is None:
            return _INVALID
        key, stored, deadline = entry
        if not hashes_equal(stored, presented):
            return _INVALID
        if deadline is not None and now >= deadline:
            return _INVALID
        if key.disabled:
            return AuthResult(None, AuthFailure.DISABLED)
        if key.is_expired(now):
            return AuthResult(None, AuthFailure.EXPIRED)
        return AuthResult(key, None, via_previous_secret=deadline is not None)

    def get(self, key_id: str) -> ApiKey | None:
        """Return the key with this id, if any."""
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._by_id.values())


def has_scope(key: ApiKey, scope: str) -> bool:
    """True if the key holds ``scope``. Scopes do not imply one another: admin is not metrics."""
    return scope in key.scopes


def allows_model(key: ApiKey, model: str) -> bool:
    """True if the key may use ``model``; a key without an allowlist may use every model."""
    return key.models is None or model in key.models


def visible_models(key: ApiKey, models: Iterable[str]) -> list[str]:
    """Filter a model listing (``/v1/models``) down to what the key may use, keeping order."""
    return [m for m in models if allows_model(key, m)]
