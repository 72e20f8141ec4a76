"""Durations (``30s``, ``15m``, ``1h``, ``7d``, ``2w``) and points in time for the CLI."""

import re
from datetime import UTC, datetime
from typing import Final

from keys.errors import DurationError

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Return seconds for ``<number><unit>``; a bare ``0`` is allowed and means no time."""
    text = text.strip()
    if text == "0":
        return 0.0
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise DurationError(f"bad duration {text!r}: use a number and s, m, h, d or w, e.g. 30d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_instant(text: str, now: float, *, future: bool) -> float:
    """Parse a duration relative to ``now`` (ahead if ``future``, else back) or an ISO date.

    ISO dates and times without a zone are taken as UTC, so the same command means the same
    instant on every host.
    """
    text = text.strip()
    if _DURATION_RE.fullmatch(text):
        delta = parse_duration(text)
        return now + delta if future else now - delta
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise DurationError(
            f"bad time {text!r}: use a duration like 24h or an ISO date like 2024-05-01"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_instant(ts: float | None) -> str:
    """Render a unix time as a short UTC ISO string; ``-`` for None."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%MZ")


def format_seconds(seconds: float) -> str:
    """Render a positive duration in its largest whole unit (``90m`` becomes ``1.5h``)."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit]:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
