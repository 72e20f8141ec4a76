"""Passive health of one pool upstream: outlier ejection, as Envoy's outlier detection does
it (pure: a clock in, a verdict out).

    healthy ──(CONSECUTIVE failures, or one refused connection)──▶ ejected
    ejected ──(its time is up: BASE_EJECTION, doubled per ejection in a row)──▶ probation
    probation ──(a request answered, or probed down and then ready)──▶ healthy
    probation ──(a failure)──▶ ejected

A failure is a connection that could not be made or broke, a request that timed out before
any answer, or a 5xx answer other than 503 (llama-server loading, which takes the upstream
out of routing until its next probe instead). A refused connection ejects at once: nothing
listens there, and every request sent meanwhile would fail the same way. In probation the
upstream is sent one request at a time until one is answered, or until its active probe
(serve's, every second) finds it ready after it found it down (it was restarted).
"""

from __future__ import annotations

from typing import Final

CONSECUTIVE: Final = 3
BASE_EJECTION: Final = 2.0  # seconds
MAX_EJECTION: Final = 60.0

HEALTHY: Final = "healthy"
EJECTED: Final = "ejected"
PROBATION: Final = "probation"


class Outlier:
    __slots__ = ("down_seen", "ejections", "failures", "probation", "reason", "until")

    def __init__(self) -> None:
        self.failures = 0  # in a row
        self.ejections = 0  # in a row: each doubles the next ejection's time
        self.until = 0.0  # monotonic time the ejection ends
        self.probation = False
        self.reason: str | None = None  # why it was last ejected
        self.down_seen = False  # its probe found it down since it was ejected

    def state(self, now: float) -> str:
        if now < self.until:
            return EJECTED
        return PROBATION if self.probation else HEALTHY

    def failed(self, now: float, reason: str, at_once: bool = False) -> bool:
        """One failure; True when it ejects the upstream now."""
        if now < self.until:
            return False  # a request sent before the ejection: already counted
        self.failures += 1
        if not (at_once or self.probation or self.failures >= CONSECUTIVE):
            return False
        self.ejections += 1
        self.until = now + min(MAX_EJECTION, BASE_EJECTION * 2 ** (self.ejections - 1))
        self.probation, self.failures, self.reason, self.down_seen = True, 0, reason, False
        return True

    def probed(self, ready: bool, now: float) -> None:
        """What its active probe found. Ready again after the probe saw it down since it was
        ejected (restarted, reloaded) ends its probation once the ejection's time is up; a
        probe that never saw it down proves nothing about the requests that failed."""
        if not ready:
            self.down_seen = self.probation
            return
        if self.probation and self.down_seen and now >= self.until:
            self.probation, self.ejections, self.reason = False, 0, None
            self.failures, self.down_seen = 0, False

    def answered(self, now: float) -> None:
        """A request the upstream answered (any status but a 5xx failure)."""
        self.failures = 0
        if self.probation and now >= self.until:
            self.probation, self.ejections, self.reason = False, 0, None
