"""PORT == PORT_HEALTH (RunPod's default): `llamagate serve` starts with one listener, and
/ping on it follows the health tier's rules: 204 while llama-server loads, 200 once it is
ready, 503 while draining. The real service and llama-server, held in its loading state by
a gate file (tests/support/service.py's gated_llama_server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import openai
import pytest
import requests

from tests.support.service import Service, gated_llama_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server


def one_listener(tmp_path: Path, env: dict[str, str]) -> Service:
    svc = Service(tmp_path, env)
    svc.port_health = svc.port
    svc.env["PORT_HEALTH"] = str(svc.port)
    return svc


def test_ping_is_204_then_200_and_chat_works_on_the_one_port(tmp_path: Path, tiny_model: Path) -> None:
    gate = tmp_path / "gate"
    svc = one_listener(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                                  "AUTH_ENABLED": "false",
                                  "LLAMA_SERVER_PATH": str(gated_llama_server(tmp_path, gate))})
    svc.start()
    try:
        # the port refuses connections until the gateway worker listens, then says 204
        # while llama-server loads (the health tier's answer, forwarded)
        wait_for(lambda: svc.ping() == 204, "/ping 204 on PORT while loading", within=30)
        health = requests.get(f"{svc.url}/health", timeout=5)
        body = health.json()
        assert (health.status_code, body["status"]) == (200, "initializing"), body
        assert "gpu" in body and "version" in body  # the health process's body, not the gateway's
        assert requests.get(f"{svc.url}/health/live", timeout=5).json() == {"status": "alive"}
        assert requests.get(f"{svc.url}/health/ready", timeout=5).status_code == 503
        gate.touch()
        svc.wait_ready(timeout=60)
        assert requests.get(f"{svc.url}/health/ready", timeout=5).json()["ready"] is True
        client = openai.OpenAI(base_url=f"{svc.url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].message.content is not None
        assert svc.health()["backend"]["state"] == "ready"
        # a drain says 503 on the one port before it closes
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: svc.ping() in (503, None), "/ping 503 while draining", within=30)
    finally:
        assert svc.stop() == 0, svc.log()


def health_pid(svc: Service) -> int:
    for line in svc.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("child") == "health" and "child_pid" in record:
                return int(record["child_pid"])
    raise AssertionError(f"no health process in the log:\n{svc.log()}")


def test_the_gateways_own_verdict_answers_while_health_does_not(tmp_path: Path,
                                                                tiny_model: Path) -> None:
    svc = one_listener(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                                  "AUTH_ENABLED": "false"})
    with svc.running():
        pid = health_pid(svc)
        os.kill(pid, signal.SIGSTOP)
        try:
            # the health process does not answer within its 2 s: the gateway's own verdict
            # (the same backend rules) does
            answer = requests.get(f"{svc.url}/ping", timeout=10)
            assert answer.status_code == 200
            assert requests.get(f"{svc.url}/health", timeout=10).json()["status"] == "healthy"
        finally:
            os.kill(pid, signal.SIGCONT)
