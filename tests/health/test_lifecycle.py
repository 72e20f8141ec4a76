"""Health tier and lifecycle with the real service: SIGSTOP, drain, idle shutdown."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


def _start(tmp: Path, model: Path, **env: str) -> Service:
    base = {"MODEL_PATH": str(model), "MODEL_NAME": "tiny", "AUTH_ENABLED": "false"}
    return Service(tmp, {**base, **env}).start().wait_ready()


def _open_stream(svc: Service, max_tokens: int) -> requests.Response:
    r = requests.post(f"{svc.url}/v1/chat/completions", stream=True, timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "go"}],
        "max_tokens": max_tokens, "stream": True})
    assert r.status_code == 200
    return r


def _events(r: requests.Response) -> list[str]:
    return [line.decode() for line in r.iter_lines() if line.startswith(b"data: ")]


def test_sigstop_gateway_makes_ping_503_fast_and_sigcont_recovers(tmp_path: Path, tiny_model: Path) -> None:
    svc = _start(tmp_path, tiny_model)
    try:
        [worker] = svc.health()["workers"]
        os.kill(worker, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            wait_for(lambda: svc.ping() == 503, "/ping 503 after SIGSTOP", within=2.0)
            assert time.monotonic() - stopped_at < 2.0
            assert svc.health()["reason"] == "gateway worker not responding"
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: svc.ping() == 200, "recovery after SIGCONT", within=5.0)
    finally:
        assert svc.stop() == 0


def test_sigterm_lets_a_running_stream_finish(tmp_path: Path, tiny_model: Path) -> None:
    # ~3000 tokens take seconds on this model: long enough to observe the drain
    svc = _start(tmp_path, tiny_model, SHUTDOWN_GRACE_SECONDS="60", CTX="8192", PARALLEL="1")
    try:
        stream = _open_stream(svc, 3000)
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert b"chat.completion.chunk" in first
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: svc.ping() == 503, "/ping 503 on SIGTERM", within=2.0)

        def refused() -> list[requests.Response]:
            r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                              timeout=5)
            return [r] if r.status_code == 503 else []
        [r] = wait_for(refused, "new requests refused while draining", within=5.0)
        assert "Retry-After" in r.headers
        assert r.json()["error"]["code"] == "shutting_down"
        rest = [line.decode() for line in lines if line.startswith(b"data: ")]
        assert rest[-1] == "data: [DONE]"
        assert not any('"error"' in e for e in rest)
        assert len(rest) > 2500
    finally:
        assert svc.stop() == 0


def test_sigterm_ends_a_stream_that_outlasts_the_grace(tmp_path: Path, tiny_model: Path) -> None:
    svc = _start(tmp_path, tiny_model, SHUTDOWN_GRACE_SECONDS="1", CTX="32768", PARALLEL="1")
    try:
        stream = _open_stream(svc, 30000)
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith(b"data: "))
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        rest = [line.decode() for line in lines if line.startswith(b"data: ")]
        final = json.loads(rest[-1].removeprefix("data: "))
        assert final["error"]["code"] == "shutting_down"
        assert len(rest) < 29000
    finally:
        assert svc.stop() == 0


def test_idle_shutdown_exits_zero_and_probes_are_not_activity(tmp_path: Path, tiny_model: Path) -> None:
    svc = _start(tmp_path, tiny_model, IDLE_SHUTDOWN_SECONDS="2")
    try:
        _idle(svc)
    finally:
        svc.stop()


def _idle(svc: Service) -> None:
    r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200
    assert svc.proc is not None

    def exited_while_probing() -> bool:
        # probes on both ports keep coming; they must not keep the worker alive
        for url in (f"{svc.health_url}/ping", f"{svc.url}/ping", f"{svc.url}/health"):
            try:
                requests.get(url, timeout=1)
            except requests.RequestException:
                pass
        return svc.proc is not None and svc.proc.poll() is not None
    wait_for(exited_while_probing, "idle shutdown", within=20.0)
    assert svc.proc.returncode == 0
    assert "IDLE_SHUTDOWN_SECONDS" in svc.log()
