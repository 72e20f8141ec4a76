"""A replica's usage cut into batches for the fleet's Redis: one batch per API key per flush,
numbered with the replica's next sequence, and sent to the APPLY script that adds it exactly
once (keys/usage_redis_scripts.py). keys/usage_redis.py decides what to send when;
keys/usage_redis_buffer.py keeps the batches on disk while Redis is away.

A batch once numbered is resent only as it is: APPLY skips a (replica, seq) not above the
one it last applied, so a batch merged with later usage, or a newer one applied first, could
count twice or not at all.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from fleet.link import FleetDown, FleetLink
from keys.usage import Tally
from keys.usage_redis_scripts import APPLY, DAY, KEEP_APPLIERS, SADD, day_name

Row = tuple[str, int, int, int, int]  # model, hour, requests, prompt tokens, completion tokens


@dataclass(eq=False, slots=True)
class Batch:
    """One key's share of one flush, as numbered when first cut: resent only as it is."""

    replica: str
    seq: int
    key_id: str
    rows: tuple[Row, ...]
    last: float | None
    sent: float | None  # wall time of the first send; None: never sent, safe at any age

    @property
    def events(self) -> int:
        return sum(r[2] for r in self.rows)

    def encode(self) -> dict[str, Any]:
        return {"replica": self.replica, "seq": self.seq, "key": self.key_id,
                "rows": [list(r) for r in self.rows], "last": self.last, "sent": self.sent}


def cut(tally: Tally, replica: str, seq: int, blocked: set[str]) -> tuple[list[Batch], Tally]:
    """One batch per key of ``tally``, numbered ``seq``; keys in ``blocked`` (an older batch of
    theirs still waits) stay in the tally returned, which was never sent."""
    rows: dict[str, list[Row]] = {}
    kept = Tally()
    for (key_id, model, hour), (r, p, c) in tally.totals.items():
        if key_id in blocked:
            kept.totals[(key_id, model, hour)] = [r, p, c]
            kept.events += r
        else:
            rows.setdefault(key_id, []).append((model, hour, r, p, c))
    batches = []
    for key_id in sorted(set(rows) | set(tally.last_used)):
        last = tally.last_used.get(key_id)
        if key_id in blocked:
            if last is not None:
                kept.last_used[key_id] = last
        else:
            batches.append(Batch(replica, seq, key_id, tuple(rows.get(key_id, ())), last, None))
    return batches, kept


def apply_call(link: FleetLink, b: Batch, retention: int) -> tuple[list[str], list[Any]]:
    """APPLY's keys and args for ``b``, its rows grouped by UTC day."""
    of = link.of_key
    keys = [of(b.key_id, "usage:applied"), of(b.key_id, "usage:appliers"),
            of(b.key_id, "usage:days"), of(b.key_id, "usage:last")]
    args: list[Any] = [b.replica, b.seq, "" if b.last is None else repr(b.last), retention,
                       KEEP_APPLIERS]
    days: dict[int, list[Row]] = {}
    for row in b.rows:
        days.setdefault(row[1] // DAY, []).append(row)
    for day, rows in sorted(days.items()):
        name = day_name(day * DAY)
        keys.append(of(b.key_id, f"usage:{name}"))
        args += [day, name, 3 * len(rows)]
        for model, hour, r, p, c in rows:
            args += [f"{hour}|{model}|r", r, f"{hour}|{model}|p", p, f"{hour}|{model}|c", c]
    return keys, args


class BatchSender:
    """Sends batches to APPLY on one link, for one retention."""

    def __init__(self, link: FleetLink, retention_days: int) -> None:
        self._link = link
        self._retention = retention_days
        self._apply = link.script(APPLY)
        self._sadd = link.script(SADD)

    async def send(self, batches: list[Batch]) -> tuple[list[bool], str | None, bool]:
        """Send ``batches`` in one pipeline: (which Redis took, the error if any, whether
        Redis is down)."""
        link, now = self._link, time.time()
        calls = []
        for b in batches:
            b.sent = b.sent or now
            calls.append(link.run_soon(self._apply, *apply_call(link, b, self._retention)))
        # the fleet's key set has a slot of its own: a separate script in the same pipeline
        calls.append(link.run_soon(self._sadd, [link.name("usage", "keys")],
                                   sorted({b.key_id for b in batches})))
        results = await asyncio.gather(*calls, return_exceptions=True)
        error, down = None, False
        for r in results:
            if isinstance(r, FleetDown):
                error, down = f"Redis at {link.where} is unreachable: {r}", True
            elif isinstance(r, RedisError):
                error = error or f"{type(r).__name__}: {r}"
            elif isinstance(r, BaseException):
                raise r
        if isinstance(results[-1], BaseException):  # resent, they add the key again (and nothing else)
            return [False] * len(batches), error, down
        return [not isinstance(r, BaseException) for r in results[:-1]], error, down
