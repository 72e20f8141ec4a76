"""Secret generation and hashing.

A plain SHA-256 (no salt, no slow KDF) is enough for generated secrets: they carry 256 bits of
randomness, so there is nothing to brute-force, and the hash must be cheap because it runs on every
request. Legacy imported secrets may be weaker; rotating them replaces them with generated ones.
"""

import hashlib
import hmac
import secrets

SECRET_PREFIX = "lg-"
HASH_SCHEME = "sha256:"
KEY_ID_PREFIX = "key_"
# Characters of the secret kept for display; long enough to tell keys apart in a listing.
DISPLAY_CHARS = 8


def new_secret() -> str:
    """Return a fresh secret: ``lg-`` followed by 32 random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """Return a fresh short key id such as ``key_1a2b3c4d``."""
    return KEY_ID_PREFIX + secrets.token_hex(4)


def hash_secret(secret: str) -> str:
    """Return the stored form of a secret: ``sha256:`` plus the hex digest."""
    return HASH_SCHEME + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def hashes_equal(a: str, b: str) -> bool:
    """Compare two stored hashes in constant time."""
    return hmac.compare_digest(a, b)


def display_prefix(secret: str) -> str:
    """Return the leading characters of a secret that may be shown in listings.

    Short legacy secrets show at most a third of their length, so the prefix never gives most of
    a weak secret away.
    """
    return secret[: min(DISPLAY_CHARS, len(secret) // 3)]
