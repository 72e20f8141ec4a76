"""The liveness rule (backend/liveness.py) with an injected clock: when a silent
llama-server counts as hung, when it is restarted, and how long each probe may wait."""

from __future__ import annotations

import pytest

from backend.liveness import LivenessSettings, Silence, Verdict
from core.config import ConfigError, load_config


def test_silence_turns_hung_at_the_bound_and_restart_at_the_longer_one() -> None:
    silence = Silence(LivenessSettings(hang_seconds=5, restart_seconds=60), now=100.0)
    assert silence.verdict(104.9) is Verdict.ALIVE
    assert silence.verdict(105.0) is Verdict.HUNG
    assert silence.verdict(159.9) is Verdict.HUNG
    assert silence.verdict(160.0) is Verdict.RESTART
    silence.answered(161.0)
    assert silence.verdict(161.5) is Verdict.ALIVE


def test_restart_seconds_zero_never_restarts() -> None:
    silence = Silence(LivenessSettings(hang_seconds=5, restart_seconds=0), now=0.0)
    assert silence.verdict(10**6) is Verdict.HUNG


def test_a_probe_waits_until_the_next_bound_it_would_decide() -> None:
    settings = LivenessSettings(hang_seconds=5, restart_seconds=60)
    silence = Silence(settings, now=0.0)
    assert silence.probe_time(1.0) == 4.0  # answered at 0: hung at 5
    assert silence.probe_time(4.99) == pytest.approx(0.05)  # never less than 50 ms
    assert silence.probe_time(6.0) == 5.0  # hung: at most a bound's worth, then judged again
    assert silence.probe_time(58.0) == 2.0  # the restart bound is nearer
    assert silence.probe_time(70.0) == 5.0


def test_probes_come_at_least_three_times_per_bound() -> None:
    assert LivenessSettings(hang_seconds=5).period == 1.0
    assert LivenessSettings(hang_seconds=1.5).period == 0.5


def test_settings_restart_bound_must_exceed_the_hang_bound() -> None:
    config = load_config({})
    assert (config.backend_hang_seconds, config.backend_hang_restart_seconds) == (5.0, 60.0)
    assert load_config({"BACKEND_HANG_RESTART_SECONDS": "0"}).backend_hang_restart_seconds == 0
    with pytest.raises(ConfigError, match="BACKEND_HANG_RESTART_SECONDS=5: must be more than"):
        load_config({"BACKEND_HANG_SECONDS": "5", "BACKEND_HANG_RESTART_SECONDS": "5"})
    with pytest.raises(ConfigError, match="BACKEND_HANG_SECONDS='0.1'"):
        load_config({"BACKEND_HANG_SECONDS": "0.1"})
