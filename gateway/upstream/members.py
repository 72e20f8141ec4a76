"""One upstream of the pool as the gateway worker sees it, and the choice among several
(pure: no I/O; the pool in gateway/upstream/pool.py owns them).

An upstream takes requests while its last probe (serve's, backend/upstreams.py) said ready,
it serves the model, it is not ejected (gateway/upstream/outlier.py) and it has a slot: at
most ``slots`` requests of ours are in flight on it (one while on probation).

Among those, two are drawn at random and the one with more free slots wins (power of two
choices, after Mitzenmacher; Envoy's least-request balancer): free slots are its slots less
the larger of our requests in flight and the slots its /slots shows busy, which counts other
clients' requests too. A tie goes to the greater weight, then to fewer requests in flight.
Two random draws instead of a scan of all keeps an upstream that has just freed a slot from
taking every request that arrives before its count moves.
"""

from __future__ import annotations

import random
from typing import Final

from gateway.upstream.backend import Upstream
from gateway.upstream.outlier import EJECTED, Outlier

# the states llamagate_upstream_state reports, one sample each
STATES: Final = ("ready", "probation", "ejected", "starting", "unreachable", "error")


class Member:
    __slots__ = ("affinity_hits", "affinity_misses", "busy", "ejections", "errors", "in_flight",
                 "index", "models", "name", "outlier", "ready", "requests", "slots",
                 "state", "upstream", "weight")

    def __init__(self, index: int, name: str, upstream: Upstream, weight: float,
                 slots: int) -> None:
        self.index = index
        self.name = name  # host:port, as metrics and /health show it
        self.upstream = upstream
        self.weight = weight
        self.slots = slots  # what it may be sent at once
        self.models: frozenset[str] = frozenset()
        self.ready = False  # its last probe
        self.state = "starting"  # its last probe's state
        self.busy = 0  # slots processing at its last /slots read (0: unknown)
        self.in_flight = 0  # our requests on it
        self.outlier = Outlier()
        # counters for /metrics, read at scrape time
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.ejections = 0
        self.affinity_hits = 0
        self.affinity_misses = 0

    def routable(self, model: str, now: float) -> bool:
        """Would take a request for ``model`` once it has a slot."""
        return self.ready and model in self.models and self.outlier.state(now) != EJECTED

    def has_room(self) -> bool:
        if self.outlier.probation:  # past its ejection (routable checked it): one at a time
            return self.in_flight == 0
        return self.in_flight < self.slots

    @property
    def free(self) -> int:
        return self.slots - max(self.in_flight, self.busy)

    def shown_state(self, now: float) -> str:
        """ready, probation, ejected, or its probe's state when that is not ready."""
        if not self.ready:
            return self.state if self.state in STATES else "error"
        state = self.outlier.state(now)
        return "ready" if state == "healthy" else state


def better(a: Member, b: Member) -> Member:
    """The one of two with more free slots; then the greater weight; then fewer in flight."""
    fa, fb = a.free, b.free
    if fa != fb:
        return a if fa > fb else b
    if a.weight != b.weight:
        return a if a.weight > b.weight else b
    return b if b.in_flight < a.in_flight else a


def choose(candidates: list[Member], draw: float = -1.0) -> Member:
    """Power of two choices among ``candidates`` (at least one)."""
    n = len(candidates)
    if n == 1:
        return candidates[0]
    if n == 2:
        return better(candidates[0], candidates[1])
    r = random.random() if draw < 0 else draw
    i = int(r * n)
    j = int((r * n - i) * (n - 1))  # a second draw from the first's remainder
    if j >= i:
        j += 1
    return better(candidates[i], candidates[j])
