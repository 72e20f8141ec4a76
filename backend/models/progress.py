"""Transfer rate and ETA from (time, bytes) samples; pure, with an injected clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    bytes_per_s: float | None
    eta_s: float | None


class RateMeter:
    """Average rate over the last ``window_s`` seconds, so a stall shows up within a window.

    Bytes that were already on disk when a transfer resumed are not a rate: the first
    sample sets the baseline, only growth after it counts.
    """

    def __init__(self, clock: Callable[[], float], window_s: float = 10.0) -> None:
        self._clock = clock
        self._window = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, done: int, total: int | None) -> Rate:
        now = self._clock()
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # restarted from zero (server ignored the range)
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_t, first_done = self._samples[0]
        elapsed = now - first_t
        if elapsed <= 0:
            return Rate(None, None)
        rate = (done - first_done) / elapsed
        if total is None or rate <= 0:
            return Rate(rate, None)
        return Rate(rate, max(total - done, 0) / rate)
