"""Parser for the legacy keys file: one ``key_id:api_key`` per line.

Errors name the line number only: the line itself holds a secret and must not reach a terminal
or a log.
"""

from dataclasses import dataclass

from keys.errors import LegacyImportError
from keys.model import KEY_ID_RE


@dataclass(frozen=True, slots=True)
class LegacyEntry:
    """One legacy key; ``secret`` is plaintext and must be hashed before it is stored."""

    line_no: int
    key_id: str
    secret: str


def parse_legacy(text: str) -> list[LegacyEntry]:
    """Parse legacy lines; blank lines and lines starting with ``#`` are skipped."""
    entries: list[LegacyEntry] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, secret = line.partition(":")
        key_id, secret = key_id.strip(), secret.strip()
        if not sep or not key_id or not secret:
            raise LegacyImportError(line_no, "expected key_id:api_key")
        if not KEY_ID_RE.fullmatch(key_id):
            raise LegacyImportError(line_no, "key id may only hold letters, digits, '_', '.', '-' (max 64)")
        if key_id in seen:
            raise LegacyImportError(line_no, f"key id {key_id!r} already used on line {seen[key_id]}")
        seen[key_id] = line_no
        entries.append(LegacyEntry(line_no, key_id, secret))
    return entries
