"""Helpers for the keys tests."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the fixed "now" of every test
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str


Cli = Callable[..., CliResult]


@dataclass(frozen=True)
class Paths:
    keys: Path
    db: Path

    def args(self) -> list[str]:
        return ["--keys-file", str(self.keys), "--usage-db", str(self.db)]


class StepSleep:
    """Stands in for asyncio.sleep in pollers: each sleep waits for the test to release it, so
    a test drives a loop one iteration at a time without real waiting."""

    def __init__(self) -> None:
        self.entered: asyncio.Queue[float] = asyncio.Queue()
        self._release: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, interval: float) -> None:
        await self.entered.put(interval)
        await self._release.get()

    async def step(self) -> None:
        """Let the loop past its current sleep and wait until it reaches the next one."""
        self._release.put_nowait(None)
        await self.entered.get()
