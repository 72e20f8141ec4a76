"""Reading the fleet's usage totals from Redis (layout: keys/usage_redis_scripts.py): what
/admin/usage answers in a fleet (through ``RedisUsage``) and what the CLI reports. Every
reader raises ``FleetDown`` while Redis is unreachable."""

from __future__ import annotations

import math

from fleet.link import FleetLink
from keys.usage import UsageRow, hour_bucket
from keys.usage_redis_scripts import DAY, GET, HGETALL, RANGE, run_many


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _usage_keys(link: FleetLink) -> list[str]:
    return sorted(_text(m) for m in await link.command("SMEMBERS", link.name("usage", "keys")))


async def read_usage(link: FleetLink, key_id: str | None = None, since: float | None = None,
                     until: float | None = None) -> list[UsageRow]:
    """Rows for hours overlapping ``[since, until)``, ordered as ``UsageStore.usage`` orders
    them (hour, key, model); every key with usage when ``key_id`` is None. Raises FleetDown."""
    key_ids = [key_id] if key_id is not None else await _usage_keys(link)
    lo = -math.inf if since is None else hour_bucket(since)
    hi = math.inf if until is None else until
    days_lo = "-inf" if since is None else str(hour_bucket(since) // DAY)
    days_hi = "+inf" if until is None else str(math.floor(until / DAY))
    found = await run_many(link, RANGE, [([link.of_key(k, "usage:days")], [days_lo, days_hi])
                                         for k in key_ids])
    wanted = [(k, _text(d)) for k, days in zip(key_ids, found, strict=True) for d in days]
    hashes = await run_many(link, HGETALL, [([link.of_key(k, f"usage:{d}")], []) for k, d in wanted])
    totals: dict[tuple[str, str, int], list[int]] = {}
    for (k, _), flat in zip(wanted, hashes, strict=True):
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            hour_text, _, rest = _text(field).partition("|")
            model, _, kind = rest.rpartition("|")
            hour = int(hour_text)
            if lo <= hour < hi:
                totals.setdefault((k, model, hour), [0, 0, 0])["rpc".index(kind)] += int(value)
    rows = [UsageRow(k, m, h, *t) for (k, m, h), t in totals.items()]
    rows.sort(key=lambda r: (r.hour, r.key_id, r.model))
    return rows


async def read_last_used(link: FleetLink, key_id: str) -> float | None:
    """Latest request time of a key in the fleet. Raises FleetDown."""
    value = await link.command("GET", link.of_key(key_id, "usage:last"))
    return None if value is None else float(value)


async def last_used_all(link: FleetLink) -> dict[str, float]:
    """Latest request time of every key with usage. Raises FleetDown."""
    key_ids = await _usage_keys(link)
    values = await run_many(link, GET, [([link.of_key(k, "usage:last")], []) for k in key_ids])
    return {k: float(v) for k, v in zip(key_ids, values, strict=True) if v is not None}
