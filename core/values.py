"""How core/config.py reads each kind of value from its text (pure: a string in, a value
out, ValueError for a bad one; the reader names the variable and what it takes)."""

from __future__ import annotations

import ipaddress
from pathlib import Path


def path(v: str | None) -> Path | None:
    return Path(v) if v else None


def bounded_int(v: str, lo: int, hi: int) -> int:
    n = int(v)
    if not lo <= n <= hi:
        raise ValueError
    return n


def parse_bool(v: str) -> bool:
    low = v.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError


def url(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError
    return v.rstrip("/")


def redis_url(v: str) -> str:
    """`redis://[user:password@]host:port/db`, `rediss://` (TLS) or `unix:///path`."""
    if not v.startswith(("redis://", "rediss://", "unix://")) or len(v) <= len("unix://"):
        raise ValueError
    return v


def urls(v: str) -> tuple[str, ...]:
    """`http://gpu1:8080,http://gpu2:8080`: each an http(s) URL, each once."""
    urls = tuple(url(u.strip()) for u in v.split(",") if u.strip())
    if len(set(urls)) != len(urls):
        raise ValueError
    return urls


def aliases(v: str) -> tuple[tuple[str, str], ...]:
    """`gpt-4o=qwen2.5-7b,*=qwen2.5-7b`: each name once, neither side empty."""
    pairs: list[tuple[str, str]] = []
    for item in v.split(","):
        if not item.strip():
            continue
        alias, eq, model = (part.strip() for part in item.partition("="))
        if not eq or not alias or not model or alias in dict(pairs):
            raise ValueError
        pairs.append((alias, model))
    return tuple(pairs)


def origins(v: str) -> tuple[str, ...]:
    items = tuple(o.strip().rstrip("/") for o in v.split(",") if o.strip())
    for origin in items:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError
    return items


def proxies(v: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in v.split(",") if p.strip())
    for item in items:
        if item != "*":
            ipaddress.ip_network(item, strict=False)  # ValueError names a bad one
    return items
