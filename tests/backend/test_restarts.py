"""Backoff and circuit breaker of the backend restart policy, with an injected clock."""

from __future__ import annotations

from pathlib import Path

from backend.argv import HTTP_HEADROOM, ServerSpec, build_argv
from backend.restarts import RestartPolicy


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(max_failures=10, window=1000, base_delay=0.5, max_delay=4)
    delays = [policy.record_failure(now=t) for t in (0, 1, 2, 3, 4)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert not policy.is_open


def test_circuit_opens_after_max_failures_in_window_and_closes_on_success() -> None:
    policy = RestartPolicy(max_failures=3, window=60, open_seconds=30)
    policy.record_failure(0)
    policy.record_failure(10)
    assert policy.record_failure(20) == 30
    assert policy.is_open
    policy.record_success()
    assert not policy.is_open


def test_a_probe_that_reached_ready_starts_the_count_again() -> None:
    """Issue 22: the crashes that opened the circuit counted on after its probe succeeded,
    so the next single crash opened it again."""
    policy = RestartPolicy(max_failures=3, window=300, base_delay=0.5, open_seconds=60)
    for t in (0, 1, 2):
        policy.record_failure(t)
    assert policy.is_open
    policy.record_success()  # the probe start after open_seconds reached ready
    assert policy.recent_failures(70) == 0
    assert policy.record_failure(70) == 0.5 and not policy.is_open  # a first crash again


def test_an_ordinary_restart_keeps_the_count() -> None:
    """A server that comes up and crashes again and again is a crash loop too."""
    policy = RestartPolicy(max_failures=3, window=300, open_seconds=60)
    policy.record_failure(0)
    policy.record_success()
    policy.record_failure(10)
    policy.record_success()
    assert policy.record_failure(20) == 60 and policy.is_open


def test_failures_outside_the_window_are_forgotten() -> None:
    policy = RestartPolicy(max_failures=3, window=60)
    policy.record_failure(0)
    policy.record_failure(10)
    policy.record_failure(100)  # the first two are older than the window
    assert not policy.is_open
    assert policy.recent_failures(100) == 1


def test_argv_keeps_the_backend_on_loopback_and_its_key_off_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = ServerSpec(binary=tmp_path / "llama-server", model_path=tmp_path / "m.gguf", alias="m",
                      port=9, api_key_file=tmp_path / "key", ngl=99, sleep_idle_seconds=60,
                      extra_args=("--flash-attn", "on"))
    argv = build_argv(spec)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--api-key" not in argv and argv[argv.index("--api-key-file") + 1] == str(tmp_path / "key")
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "60"
    assert argv[-2:] == ["--flash-attn", "on"] and "--metrics" in argv


def test_llama_server_has_an_http_thread_for_every_request_and_the_probe(tmp_path: Path) -> None:
    """Each request holds one of llama-server's HTTP threads until its answer ends: with
    fewer threads than the gateway sends, /health waited behind streams and the liveness
    probe read a busy server as a hung one (tests/faults/test_backend_faults.py)."""
    def threads(parallel: int, in_flight: int) -> int:
        argv = build_argv(ServerSpec(binary=tmp_path / "llama-server", model_path=tmp_path / "m",
                                     alias="m", port=9, api_key_file=tmp_path / "key",
                                     parallel=parallel, in_flight=in_flight))
        return int(argv[argv.index("--threads-http") + 1])

    assert threads(parallel=2, in_flight=8) == 8 + HTTP_HEADROOM
    assert threads(parallel=4, in_flight=0) == 4 + HTTP_HEADROOM  # MAX_CONCURRENT_REQUESTS unset
