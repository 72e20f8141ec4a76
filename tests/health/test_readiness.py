"""The health tier's readiness rules, without processes: states and a clock in."""

from __future__ import annotations

from typing import Any

from health.readiness import STALE_AFTER, judge

NOW = 1000.0


def serve(phase: str = "running", backend: str = "ready", restarts: int = 0,
          ts: float = NOW) -> dict[str, Any]:
    return {"phase": phase, "backend": {"state": backend, "restarts": restarts}, "ts": ts}


def worker(ts: float = NOW) -> dict[str, Any]:
    return {"ts": ts, "in_flight": 0, "queued": 0}


def test_no_state_yet_is_initializing() -> None:
    assert judge(None, [], NOW, 1).ping == 204


def test_ready_backend_and_fresh_worker_is_200() -> None:
    v = judge(serve(), [worker()], NOW, 1)
    assert (v.status, v.ping) == ("healthy", 200)


def test_backend_loading_is_204() -> None:
    assert judge(serve("starting", "starting"), [worker()], NOW, 1).ping == 204


def test_restarting_backend_is_degraded_204() -> None:
    v = judge(serve(backend="restarting", restarts=1), [worker()], NOW, 1)
    assert (v.status, v.ping) == ("degraded", 204)
    v = judge(serve(backend="starting", restarts=1), [worker()], NOW, 1)
    assert (v.status, v.ping) == ("degraded", 204)


def test_circuit_open_is_503() -> None:
    assert judge(serve(backend="circuit_open"), [worker()], NOW, 1).ping == 503


def test_draining_is_503() -> None:
    v = judge(serve("draining"), [worker()], NOW, 1)
    assert (v.status, v.ping) == ("draining", 503)


def test_stale_worker_heartbeat_is_503() -> None:
    v = judge(serve(), [worker(ts=NOW - STALE_AFTER - 0.1)], NOW, 1)
    assert v.ping == 503 and "worker" in v.reason


def test_stale_serve_heartbeat_is_503() -> None:
    assert judge(serve(ts=NOW - STALE_AFTER - 0.1), [worker()], NOW, 1).ping == 503


def test_worker_not_up_yet_is_starting_but_a_lost_one_is_down() -> None:
    assert judge(serve(), [], NOW, 1, workers_seen=False).ping == 204
    assert judge(serve(), [], NOW, 1, workers_seen=True).ping == 503
    assert judge(serve(), [worker()], NOW, 2, workers_seen=False).ping == 204
