"""A gateway worker that crashes is restarted by serve, and leaves nothing behind that
keeps counting: the health tier is ready again, the in-flight gauge forgets it."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from health.readiness import STALE_AFTER
from tests.health.processes import metric, runtime_dir
from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


def _start(tmp: Path, model: Path, **env: str) -> Service:
    base = {"MODEL_PATH": str(model), "MODEL_NAME": "tiny", "AUTH_ENABLED": "false"}
    return Service(tmp, {**base, **env}).start().wait_ready()


def _kill_and_see_it_replaced(svc: Service, pid: int, workers: int) -> None:
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        pids = svc.health()["workers"]
        return len([p for p in pids if p != pid]) == workers
    wait_for(replaced, "serve to restart the worker", within=20.0)

    def ready_past_stale() -> bool:
        # the dead worker's last heartbeat has aged past STALE_AFTER: were it still read,
        # it would be a hung worker and /ping 503
        return time.monotonic() - killed_at > 2 * STALE_AFTER and svc.ping() == 200
    wait_for(ready_past_stale, "/ping 200 after the restart", within=10.0)
    body = svc.health()
    assert body["status"] == "healthy" and pid not in body["workers"]
    r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                      timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_health_is_ready_again_after_a_worker_is_killed(tmp_path: Path, tiny_model: Path,
                                                        workers: int) -> None:
    svc = _start(tmp_path, tiny_model, GATEWAY_WORKERS=str(workers))
    try:
        victim = svc.health()["workers"][0]
        _kill_and_see_it_replaced(svc, victim, workers)
        assert svc.proc is not None
        assert not list(runtime_dir(svc.proc.pid).glob(f"*gateway-{victim}.json*"))
    finally:
        assert svc.stop() == 0


def test_a_killed_workers_request_leaves_the_in_flight_gauge(tmp_path: Path,
                                                            tiny_model: Path) -> None:
    # two workers: prometheus_client's multiprocess mode, where each worker's live gauges
    # are files that outlive it unless serve marks it dead
    svc = _start(tmp_path, tiny_model, GATEWAY_WORKERS="2", CTX="16384", PARALLEL="1")
    try:
        stream = requests.post(f"{svc.url}/v1/completions", stream=True, timeout=60, json={
            "prompt": "go", "max_tokens": 16000, "stream": True})
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a collected generator would close the stream
        next(line for line in lines if line.startswith(b"data: "))

        def in_flight() -> float:
            return metric(requests.get(f"{svc.url}/metrics", timeout=5).text,
                          "llamagate_in_flight_requests")
        assert in_flight() == 1
        assert svc.proc is not None
        rdir = runtime_dir(svc.proc.pid)

        def busy_worker() -> int | None:
            for path in rdir.glob("gateway-*.json"):
                state = json.loads(path.read_text())
                if state.get("in_flight"):
                    return int(state["pid"])
            return None
        busy = wait_for(busy_worker, "the worker holding the stream", within=5.0)
        _kill_and_see_it_replaced(svc, busy, 2)
        stream.close()
        assert in_flight() == 0
    finally:
        assert svc.stop() == 0
