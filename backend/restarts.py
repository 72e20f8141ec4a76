"""Restart policy for the backend: exponential backoff plus a circuit breaker.

A crash-looping llama-server (bad model, out of VRAM) must not spin: after
`max_failures` within `window` seconds the circuit opens, and only one probe
start is attempted after `open_seconds`. A probe that reaches ready closes the
circuit and starts the count again: the crashes that opened it were dealt with, and
counting them on would re-open it at the next single crash (issue 22). The clock is
injected for tests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    max_failures: int = 5
    window: float = 300.0
    base_delay: float = 0.5
    max_delay: float = 30.0
    open_seconds: float = 60.0
    _failures: deque[float] = field(default_factory=deque)
    _opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def record_failure(self, now: float) -> float:
        """Note a crash; return the delay before the next start attempt."""
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        if len(self._failures) >= self.max_failures:
            self._opened_at = now
            return self.open_seconds
        return float(min(self.max_delay, self.base_delay * 2.0 ** (len(self._failures) - 1)))

    def record_success(self) -> None:
        """A start that reached ready. After the circuit's probe, the count starts again;
        after an ordinary restart, earlier crashes still count in the window (a server
        that comes up and crashes again and again is a crash loop too)."""
        if self._opened_at is not None:
            self._failures.clear()
        self._opened_at = None

    def recent_failures(self, now: float) -> int:
        return sum(1 for t in self._failures if now - t <= self.window)
