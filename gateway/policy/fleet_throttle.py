"""Failed authentications per client address, counted by the whole fleet in Redis.

Each failure is counted here (gateway/policy/throttle.py's GCRA, so the throttle holds
while Redis is down) and sent to Redis, not waited for: a script moves the address's
fleet-wide GCRA time and answers how long until its budget is whole again, which this
replica then takes as its own when it is later than what it counted. So an address that
fails on several replicas is throttled by its total, from the answer to its next failure
on any of them; a request that authenticates costs no round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fleet.link import FleetLink
from gateway.policy.throttle import AddressThrottle, counted_as

# KEYS: the address's record. ARGV: seconds one failure adds. Answer: seconds until the
# address's budget is whole again (GCRA's theoretical arrival time, minus now).
FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + tonumber(ARGV[1])
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return tostring(tat - now)
"""


class FleetAddressThrottle(AddressThrottle):
    def __init__(self, link: FleetLink, per_minute: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(per_minute, clock=clock)
        self.link = link
        self._failure = link.script(FAILURE)

    def failure(self, address: str) -> None:
        super().failure(address)
        if not self.link.up:
            return
        counted = counted_as(address)
        # no hash tag: the addresses spread over a cluster's slots
        done = self.link.run_soon(self._failure, (f"{self.link.prefix}auth:{counted}",),
                                  (self.interval,))
        done.add_done_callback(lambda answer: self._heard(counted, answer))

    def _heard(self, counted: str, answer: asyncio.Future[Any]) -> None:
        if answer.cancelled() or answer.exception() is not None:
            return  # Redis is down: this replica's own count stands
        clear_at = self.clock() + float(answer.result())
        if clear_at > self._clear_at.get(counted, 0.0):
            self._clear_at[counted] = clear_at
            self._clear_at.move_to_end(counted)
