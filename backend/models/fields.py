"""Value rules shared by operator overrides and serving profiles.

Each ``check_*`` returns the value, normalised, or raises ``BadValue`` whose message
states the accepted form; callers attach the field name (and line number) to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ALIAS_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIERS = ("fast", "balanced", "powerful")
TAGS = ("thinking", "embeddings", "vision", "tools", "chat", "code")
MAX_PARALLEL = 64
# llama-server argv entries: long enough for a path or a JSON blob, short enough to log.
MAX_EXTRA_ARG_LEN = 4096
MAX_EXTRA_ARGS = 64


class BadValue(ValueError):
    """The message is the accepted form, e.g. 'must be an integer >= 0 (got -1)'."""


def _got(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadValue(f"must be true or false (got {_got(value)})")
    return value


def check_int(value: object, *, minimum: int, maximum: int | None = None) -> int:
    # bool is an int subclass; `parallel: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(f"must be an integer {_range(minimum, maximum)} (got {_got(value)})")
    if value < minimum or (maximum is not None and value > maximum):
        raise BadValue(f"must be an integer {_range(minimum, maximum)} (got {value})")
    return value


def _range(minimum: int, maximum: int | None) -> str:
    return f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"


def check_alias(value: object) -> str:
    if not isinstance(value, str) or not ALIAS_RE.fullmatch(value):
        raise BadValue(f"must match [A-Za-z0-9._:-]{{1,128}} (got {_got(value)})")
    return value


def check_tier(value: object) -> str:
    if value not in TIERS:
        raise BadValue(f"must be one of {'|'.join(TIERS)} (got {_got(value)})")
    assert isinstance(value, str)
    return value


def check_tags(value: object) -> tuple[str, ...]:
    accepted = f"must be a list of distinct tags from {', '.join(TAGS)}"
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise BadValue(f"{accepted} (got {_got(value)})")
    tags: list[str] = []
    for tag in value:
        if tag not in TAGS or tag in tags:
            raise BadValue(f"{accepted} (got {_got(tag)})")
        tags.append(tag)
    return tuple(tags)


def check_extra_args(value: object) -> tuple[str, ...]:
    accepted = (
        f"must be a list of at most {MAX_EXTRA_ARGS} strings, each 1..{MAX_EXTRA_ARG_LEN}"
        " characters without NUL or newline"
    )
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) > MAX_EXTRA_ARGS:
        raise BadValue(f"{accepted} (got {_got(value)})")
    for arg in value:
        if (
            not isinstance(arg, str)
            or not 0 < len(arg) <= MAX_EXTRA_ARG_LEN
            or any(ch in arg for ch in "\x00\n\r")
        ):
            raise BadValue(f"{accepted} (got {_got(arg)})")
    return tuple(value)


def check_ctx_size(value: object) -> int:
    # 0 means "the model's own context length" to llama-server.
    return check_int(value, minimum=0)


def check_n_gpu_layers(value: object) -> int:
    # -1 means "all layers" to llama-server.
    return check_int(value, minimum=-1)


def check_parallel(value: object) -> int:
    return check_int(value, minimum=1, maximum=MAX_PARALLEL)
