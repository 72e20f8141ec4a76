"""Whether a running llama-server still answers: its /health probed with a deadline.

llama-server answers /health from its HTTP threads, apart from the threads that
generate: with 40 streams on 4 slots and 40 idle keep-alive connections, on two busy
cores, it answered within 3 ms. A /health that goes unanswered for seconds therefore
means a stopped or wedged process, not a busy one (issue 22: a SIGSTOPped llama-server
kept /ping at 200 for 40 s while every request hung until REQUEST_TIMEOUT).

The rule is pure (times in, verdict out): silent for `hang_seconds` → unresponsive
(/ping 503, requests refused); silent for `restart_seconds` → killed and restarted.
A probe is given the time left before the next of those bounds, so a stopped server is
noticed `hang_seconds` after its last answer, not a probe timeout later; probes start
every second (more often for a bound under 3 s), so each has most of the bound.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import aiohttp

PROBE_INTERVAL: Final = 1.0
MIN_PROBE_TIME: Final = 0.05


@dataclass(frozen=True)
class LivenessSettings:
    hang_seconds: float = 5.0  # BACKEND_HANG_SECONDS
    restart_seconds: float = 60.0  # BACKEND_HANG_RESTART_SECONDS; 0: never restarted for it
    interval: float = PROBE_INTERVAL

    @property
    def period(self) -> float:
        """Time from one probe's start to the next's: at least three probes per bound, so
        that one probe's answer never has to come within the bound's last instants (a
        one-second bound probed each second left a probe 50 ms: a busy machine missed it)."""
        return min(self.interval, self.hang_seconds / 3)


class Verdict(enum.Enum):
    ALIVE = "alive"
    HUNG = "hung"
    RESTART = "restart"


class Silence:
    """How long llama-server has gone without answering, and what that means."""

    def __init__(self, settings: LivenessSettings, now: float) -> None:
        self.settings = settings
        self.last_answer = now

    def answered(self, now: float) -> None:
        self.last_answer = now

    def silent_for(self, now: float) -> float:
        return now - self.last_answer

    def verdict(self, now: float) -> Verdict:
        silent = self.silent_for(now)
        if silent < self.settings.hang_seconds:
            return Verdict.ALIVE
        if self.settings.restart_seconds and silent >= self.settings.restart_seconds:
            return Verdict.RESTART
        return Verdict.HUNG

    def probe_time(self, now: float) -> float:
        """How long the next probe may wait: until the next bound it would decide."""
        silent = self.silent_for(now)
        bounds = [b for b in (self.settings.hang_seconds, self.settings.restart_seconds)
                  if b > silent]
        left = min(bounds) - silent if bounds else self.settings.hang_seconds
        return max(MIN_PROBE_TIME, min(left, self.settings.hang_seconds))


async def answers(session: aiohttp.ClientSession, url: str, within: float) -> bool:
    """Whether `url`/health gives any HTTP answer within `within` seconds (a 503 while a
    model reloads is an answer: the process is alive)."""
    try:
        async with session.get(f"{url}/health",
                               timeout=aiohttp.ClientTimeout(total=within)) as resp:
            await resp.read()
            return True
    except (TimeoutError, aiohttp.ClientError):
        return False


def probe_session() -> aiohttp.ClientSession:
    """A new connection per probe: one kept alive would hold one of llama-server's HTTP
    threads between probes."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
