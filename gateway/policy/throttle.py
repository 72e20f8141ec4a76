"""Failed authentications per client address, the pure core of the auth-failure throttle
(gateway/policy/shared_throttle.py keeps its numbers where every worker counts them)."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable


class AddressThrottle:
    """Failed authentications per client address: ``per_minute`` of them, then 429.

    A GCRA (one float per address: when its failure budget is whole again). At most
    ``max_addresses`` are tracked, least recently failing dropped first, so a spray from
    many addresses cannot grow memory without bound. An IPv6 client is counted by its /64,
    which one host or subscriber usually has whole: per address, it could try 2^64 of them.
    """

    def __init__(self, per_minute: int, *, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 60.0 / per_minute
        self.tolerance = 60.0 - self.interval  # a burst of per_minute failures is let through
        self.max_addresses = max_addresses
        self.clock = clock
        self._clear_at: OrderedDict[str, float] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        clear_at = self._clear_at.get(counted_as(address))
        return 0.0 if clear_at is None else max(0.0, clear_at - self.clock() - self.tolerance)

    def failure(self, address: str) -> None:
        address = counted_as(address)
        now = self.clock()
        self._clear_at[address] = max(self._clear_at.pop(address, now), now) + self.interval
        if len(self._clear_at) > self.max_addresses:
            self._clear_at.popitem(last=False)


@functools.lru_cache(maxsize=4096)  # an IPv6 address's /64 costs ~20 µs to work out
def counted_as(address: str) -> str:
    """The throttle's unit for ``address``: itself, or an IPv6 address's /64."""
    if ":" not in address:
        return address  # IPv4, or no address ("-")
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
