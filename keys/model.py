"""The API key record.

Records are immutable; changing a key means building a new record (``dataclasses.replace``), so a
keyring snapshot handed to request handlers can never change under them. Every record is checked
on construction, which keeps a hand-edited keys file from smuggling in an unknown scope.
"""

import re
from dataclasses import dataclass, field
from typing import Final

from keys.errors import KeyFormatError

SCOPE_INFERENCE: Final = "inference"
SCOPE_ADMIN: Final = "admin"
SCOPE_METRICS: Final = "metrics"
SCOPES: Final = frozenset({SCOPE_INFERENCE, SCOPE_ADMIN, SCOPE_METRICS})

# Ids appear in logs, URLs and CLI arguments, so keep them to a shell- and log-safe alphabet.
KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HASH_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAME_LENGTH: Final = 200


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; ``None`` means "use the service default"."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise KeyFormatError(f"limit {name} must be an integer")
            if value is not None and value < 1:
                raise KeyFormatError(f"limit {name} must be at least 1")

    def resolve(self, defaults: "Limits") -> "Limits":
        """Return these limits with every ``None`` filled from ``defaults``."""
        return Limits(
            requests_per_minute=_first(self.requests_per_minute, defaults.requests_per_minute),
            tokens_per_minute=_first(self.tokens_per_minute, defaults.tokens_per_minute),
            max_concurrent=_first(self.max_concurrent, defaults.max_concurrent),
        )


def _first(value: int | None, default: int | None) -> int | None:
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class PreviousSecret:
    """A rotated-out secret that keeps working until ``valid_until`` (unix time, exclusive)."""

    secret_hash: str
    valid_until: float

    def __post_init__(self) -> None:
        if not HASH_RE.fullmatch(self.secret_hash):
            raise KeyFormatError("previous secret hash is not sha256:<64 hex>")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key. Holds the hash of its secret, never the secret itself."""

    id: str
    name: str
    secret_hash: str
    prefix: str
    scopes: frozenset[str]
    created: float
    expires: float | None = None
    disabled: bool = False
    limits: Limits = field(default_factory=Limits)
    # None allows every model; a set allows only the models named in it.
    models: frozenset[str] | None = None
    previous: tuple[PreviousSecret, ...] = ()

    def __post_init__(self) -> None:
        if not KEY_ID_RE.fullmatch(self.id):
            raise KeyFormatError(f"invalid key id {self.id!r}")
        # Names are printed in tables and logs: one printable line, of a sane length.
        if not self.name or len(self.name) > MAX_NAME_LENGTH or not self.name.isprintable():
            raise KeyFormatError(f"key {self.id}: name must be 1-{MAX_NAME_LENGTH} printable characters")
        if not HASH_RE.fullmatch(self.secret_hash):
            raise KeyFormatError(f"key {self.id}: secret hash is not sha256:<64 hex>")
        unknown = self.scopes - SCOPES
        if unknown:
            raise KeyFormatError(f"key {self.id}: unknown scope(s) {', '.join(sorted(unknown))}")
        if self.models is not None and any(not m for m in self.models):
            raise KeyFormatError(f"key {self.id}: empty model name in allowlist")

    def is_expired(self, now: float) -> bool:
        """True once ``now`` has reached the expiry time."""
        return self.expires is not None and now >= self.expires

    def all_hashes(self) -> tuple[str, ...]:
        """The current hash followed by every previous-secret hash."""
        return (self.secret_hash, *(p.secret_hash for p in self.previous))
