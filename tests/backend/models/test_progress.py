from __future__ import annotations

import pytest

from backend.models.progress import RateMeter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_over_a_window() -> None:
    clock = Clock()
    meter = RateMeter(clock, window_s=10.0)
    first = meter.sample(1_000, 11_000)  # resumed with 1000 bytes already on disk
    assert first.bytes_per_s is None and first.eta_s is None
    clock.now += 2
    rate = meter.sample(3_000, 11_000)
    assert rate.bytes_per_s == pytest.approx(1_000)
    assert rate.eta_s == pytest.approx(8)


def test_a_stall_shows_within_the_window() -> None:
    clock = Clock()
    meter = RateMeter(clock, window_s=4.0)
    for done in (0, 1000, 2000):
        meter.sample(done, 10_000)
        clock.now += 1
    for _ in range(6):
        last = meter.sample(2000, 10_000)
        clock.now += 1
    assert last.bytes_per_s == 0 and last.eta_s is None


def test_restart_from_zero_resets() -> None:
    clock = Clock()
    meter = RateMeter(clock)
    meter.sample(5000, 10_000)
    clock.now += 1
    assert meter.sample(0, 10_000).bytes_per_s is None
