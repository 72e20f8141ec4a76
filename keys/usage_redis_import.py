"""``migrate --to-redis``'s usage (keys/cli_migrate.py): one machine's SQLite usage rows added
to the fleet's counters in Redis (layout and the IMPORT script: keys/usage_redis_scripts.py),
each row once however often the migration runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fleet.link import FleetLink
from keys.usage import UsageRow
from keys.usage_redis_scripts import DAY, IMPORT, day_name, run_many


async def import_rows(link: FleetLink, rows: Iterable[UsageRow], last_used: Mapping[str, float],
                      *, retention_days: int = 400) -> tuple[int, int]:
    """Add SQLite usage rows to the fleet's counters; returns (rows changed, rows already there).
    Each key's rows go in one script that adds only what earlier imports did not (kept in
    ``usage:migrated``), so a rerun after the rows grew adds the difference. Rows of days past
    the retention are skipped and counted in neither. Raises FleetDown."""
    per_key: dict[str, dict[tuple[str, int], list[int]]] = {}
    for r in rows:
        t = per_key.setdefault(r.key_id, {}).setdefault((r.model, r.hour), [0, 0, 0])
        t[0] += r.requests
        t[1] += r.prompt_tokens
        t[2] += r.completion_tokens
    key_ids = sorted(set(per_key) | set(last_used))
    calls = []
    for k in key_ids:
        keys = [link.of_key(k, "usage:migrated"), link.of_key(k, "usage:days"),
                link.of_key(k, "usage:last")]
        args: list[Any] = ["" if k not in last_used else repr(float(last_used[k])), retention_days]
        for (model, hour), (req, prompt, completion) in sorted(per_key.get(k, {}).items()):
            name = day_name(hour)
            keys.append(link.of_key(k, f"usage:{name}"))
            args += [hour // DAY, name, f"{hour}|{model}", req, prompt, completion]
        calls.append((keys, args))
    for i in range(0, len(key_ids), 1000):
        await link.command("SADD", link.name("usage", "keys"), *key_ids[i:i + 1000])
    results = await run_many(link, IMPORT, calls, chunk=16)
    return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)
