"""Per-key rate limits, the pure core: token buckets, one key's limits, the table of keys.

Plain objects that take ``now`` from an injected clock, O(1) per request. The shell that
applies them to requests is gateway/policy/ratelimit.py; with several gateway workers the
numbers are kept where every worker counts them (gateway/policy/shared_limits.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from keys.model import Limits

Clock = Callable[[], float]
MINUTE = 60.0


class LimitExceeded(Exception):
    def __init__(self, what: str, retry_after: float) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after


class ReservationTooLarge(Exception):
    """A reservation above the bucket's capacity: it could never be granted."""

    def __init__(self, asked: int, capacity: int) -> None:
        super().__init__(f"{asked} tokens asked, {capacity} per minute allowed")
        self.asked = asked
        self.capacity = capacity


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``capacity`` per minute."""

    __slots__ = ("_level", "_updated", "capacity", "rate")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / MINUTE
        self.store(self.capacity, now)

    # Where the level and the time of its last change are kept: here, or (SharedBucket in
    # gateway/policy/shared_limits.py) in a table every worker reads. Methods, not attributes, so
    # a subclass can move them: a property cannot stand in for a compiled class's attribute.
    def load(self) -> tuple[float, float]:
        return self._level, self._updated

    def store(self, level: float, updated: float) -> None:
        self._level, self._updated = level, updated

    def _refilled(self, now: float) -> tuple[float, float]:
        level, updated = self.load()
        if now > updated:
            level, updated = min(self.capacity, level + (now - updated) * self.rate), now
            self.store(level, updated)
        return level, updated

    def refill(self, now: float) -> float:
        return self._refilled(now)[0]

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` tokens are there; 0 when they are now."""
        missing = amount - self.refill(now)
        return 0.0 if missing <= 0 else missing / self.rate

    def add(self, amount: float, now: float) -> None:
        """Give back (positive) or charge (negative) tokens; a charge may leave a debt, of
        at most one bucket: a minute's refill pays it back (usage above a reservation is
        known only once the backend has answered, so it cannot be refused)."""
        level, updated = self._refilled(now)
        self.store(max(-self.capacity, min(self.capacity, level + amount)), updated)

    def reset_after(self, now: float) -> float:
        return (self.capacity - self.refill(now)) / self.rate


class KeyLimiter:
    """The limits of one key, as resolved against the service defaults (in this process;
    gateway/policy/shared_limits.py keeps the numbers where every worker counts them)."""

    def __init__(self, limits: Limits, now: float) -> None:
        self._in_flight = 0  # requests of the key holding a concurrency place
        self.limits = limits
        self.source: Limits | None = None  # the key's own limits these were resolved from
        self.requests = self._bucket("requests", None, limits.requests_per_minute, now)
        self.tokens = self._bucket("tokens", None, limits.tokens_per_minute, now)

    def _bucket(self, kind: str, bucket: TokenBucket | None, per_minute: int | None,
                now: float) -> TokenBucket | None:
        return _resized(bucket, per_minute, now)

    # counted here, or across workers (SharedKeyLimiter): methods for the reason load() is
    def in_flight(self) -> int:
        return self._in_flight

    def _hold(self, change: int) -> None:
        self._in_flight += change

    def reconfigure(self, limits: Limits, now: float) -> None:
        """Apply limits changed by a keys reload, keeping how much of each bucket is used."""
        self.requests = self._bucket("requests", self.requests, limits.requests_per_minute, now)
        self.tokens = self._bucket("tokens", self.tokens, limits.tokens_per_minute, now)
        self.limits = limits

    def admit(self, now: float) -> None:
        """Take a concurrency slot and one request, or raise ``LimitExceeded``."""
        cap = self.limits.max_concurrent
        if cap is not None and self.in_flight() >= cap:
            raise LimitExceeded(f"{cap} concurrent requests", 1.0)
        if self.requests is not None:
            wait = self.requests.wait_for(1, now)
            if wait > 0:
                raise LimitExceeded(f"{self.limits.requests_per_minute} requests per minute", wait)
            self.requests.add(-1, now)
        self._hold(1)

    def reserve(self, amount: int, now: float, asked: bool = True) -> int:
        """Reserve tokens for a request; returns what was reserved (0 when unlimited).
        A reservation the client ``asked`` for (its max_tokens) above the whole bucket could
        never be granted: ``ReservationTooLarge`` (admitted, it overshot the limit as a
        debt). One it did not ask for (the default) is capped at the bucket."""
        if self.tokens is None:
            return 0
        capacity = int(self.tokens.capacity)
        if amount > capacity:
            if asked:
                if self.requests is not None:
                    self.requests.add(1, now)  # a refused request does not count against the rpm
                raise ReservationTooLarge(amount, capacity)
            amount = capacity
        wait = self.tokens.wait_for(amount, now)
        if wait > 0:
            if self.requests is not None:
                self.requests.add(1, now)  # a refused request does not count against the rpm
            raise LimitExceeded(f"{self.limits.tokens_per_minute} tokens per minute", wait)
        self.tokens.add(-amount, now)
        return amount

    def release(self, reserved: int, used: int | None, now: float) -> None:
        """End a request; ``used`` None keeps the reservation as the charge."""
        self._hold(-1)
        if self.tokens is not None and used is not None:
            self.tokens.add(reserved - used, now)

    def headers(self, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.refill(now))))
                out[f"x-ratelimit-reset-{name}"] = format_reset(bucket.reset_after(now))
        return out


def _resized(bucket: TokenBucket | None, per_minute: int | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if bucket is not None and bucket.capacity == per_minute:
        return bucket
    resized = TokenBucket(per_minute, now)
    if bucket is not None:
        resized.store(min(resized.capacity, bucket.refill(now)), now)
    return resized


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``6s``, ``1m30s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


MakeLimiter = Callable[[str, Limits, float], KeyLimiter]
_NONE = Limits()  # no limit of any kind


class RateLimiter:
    """One ``KeyLimiter`` per key id; a key's own limits override the defaults."""

    def __init__(self, defaults: Limits, clock: Clock = time.monotonic,
                 make: MakeLimiter | None = None) -> None:
        self.defaults = defaults
        self.clock = clock
        # gateway/policy/shared_limits.py's maker keeps a limited key's numbers in a shared file and
        # an unlimited one's here; without one, every key's numbers are here
        self._make = make or (lambda key_id, limits, now: KeyLimiter(limits, now))
        self._remake = make is not None
        self._keys: dict[str, KeyLimiter] = {}

    def for_key(self, key_id: str, limits: Limits) -> KeyLimiter:
        limiter = self._keys.get(key_id)
        if limiter is not None and limiter.source is limits:
            return limiter  # the same key object as last time: nothing to re-resolve
        effective = limits.resolve(self.defaults)
        if limiter is None or (self._remake and (limiter.limits == _NONE) != (effective == _NONE)):
            # new, or, with a maker, between unlimited and limited, which it keeps apart (the
            # requests then in flight are not counted by the new limiter, and their end is
            # counted by the old one: a reload's passing slack, not a drift)
            limiter = self._keys[key_id] = self._make(key_id, effective, self.clock())
        elif limiter.limits != effective:
            limiter.reconfigure(effective, self.clock())
        limiter.source = limits
        return limiter
