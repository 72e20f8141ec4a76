import pytest

from keys.durations import format_instant, format_seconds, parse_duration, parse_instant
from keys.errors import DurationError
from tests.keys.helpers import T0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("7d", 604800),
        ("2w", 1209600),
        ("1.5h", 5400),
        ("0", 0),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10", "-1h", "1y", "1 h", "abc"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_parse_instant() -> None:
    assert parse_instant("1h", T0, future=True) == T0 + 3600
    assert parse_instant("24h", T0, future=False) == T0 - 86400
    assert parse_instant("2024-05-01", T0, future=False) == 1714521600
    assert parse_instant("2024-05-01T02:00+02:00", T0, future=False) == 1714521600
    with pytest.raises(DurationError, match="bad time"):
        parse_instant("next tuesday", T0, future=True)


def test_formatting() -> None:
    assert format_instant(None) == "-"
    assert format_instant(1714521600) == "2024-05-01T00:00Z"
    assert format_seconds(5400) == "1.5h" and format_seconds(30) == "30s"
