"""The three tiers end to end: real llama-server, real processes, the OpenAI SDK."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest
import requests

from tests.support.metrics import Samples
from tests.support.service import Service, gated_llama_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


def client(svc: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.url}/v1", api_key="unused", max_retries=0)


def test_sdk_chat_completion(service: Service) -> None:
    reply = client(service).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_sdk_streamed_chat_completion(service: Service) -> None:
    stream = client(service).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sdk_models_list(service: Service) -> None:
    ids = [m.id for m in client(service).models.list()]
    assert ids == ["tiny"]


def test_any_model_name_reaches_the_one_model(service: Service) -> None:
    """As llama-server serving one model does (issue 26): clients hard-code OpenAI names.
    Only a model served can be retrieved."""
    reply = client(service).chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert reply.model == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client(service).models.retrieve("gpt-3.5-turbo")
    assert info.value.code == "model_not_found"


def test_request_id_is_echoed(service: Service) -> None:
    r = requests.post(f"{service.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                      headers={"X-Request-ID": "abc-123"}, timeout=10)
    assert r.status_code == 200
    assert r.headers["X-Request-ID"] == "abc-123"


def test_health_port_reports_ready(service: Service) -> None:
    body = service.health()
    assert body["status"] == "healthy"
    assert body["backend"]["state"] == "ready"
    assert body["models"] == ["tiny"]
    assert body["auth"] is False
    for path in ("/ping", "/health"):  # no server software and version for a scanner
        assert requests.get(service.health_url + path, timeout=2).headers["Server"] == "llamagate"


def test_backend_key_is_never_on_the_command_line(service: Service) -> None:
    pid = service.health()["backend"]["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--api-key-file" in cmdline
    assert b"--api-key" not in cmdline
    key_file = Path(cmdline[cmdline.index(b"--api-key-file") + 1].decode())
    assert key_file.stat().st_mode & 0o777 == 0o600
    secret = key_file.read_text().strip()
    assert secret not in service.log()
    # the backend refuses requests without its key, so only the gateway can use it
    port = cmdline[cmdline.index(b"--port") + 1].decode()
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a"}, timeout=5)
    assert r.status_code == 401


def test_ping_goes_204_then_200_and_outage_gets_503(tmp_path: Path, tiny_model: Path) -> None:
    gate = tmp_path / "gate"
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false",
                             "LLAMA_SERVER_PATH": str(gated_llama_server(tmp_path, gate))}).start()
    try:
        # held in loading: the health port says initializing, the gateway refuses politely
        assert wait_for(lambda: svc.ping(), "the health port", within=30) == 204
        wait_for(svc.gateway_up, "the gateway port", within=30)
        assert svc.ping() == 204
        r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                          timeout=10)
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert r.json()["error"]["type"] == "service_unavailable"
        gate.touch()
        svc.wait_ready()

        # SIGKILL the backend with the gate closed: the restart is held, so the outage is ours
        gate.unlink()
        pid = svc.health()["backend"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: svc.health()["backend"]["state"] != "ready", "the outage", within=30)
        r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                          timeout=10)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert svc.ping() == 204  # restarting: not ready, not dead
        gate.touch()
        svc.wait_ready()
        body = svc.health()
        assert body["backend"]["restarts"] == 1 and body["backend"]["pid"] != pid
        r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                          timeout=10)
        assert r.status_code == 200
    finally:
        assert svc.stop() == 0


def test_an_open_circuit_says_when_the_backend_is_tried_again(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    """A crash loop opens the circuit for a minute: Retry-After says so, not 5 s."""
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false", "BACKEND_MAX_RESTARTS": "1"}).start()
    try:
        svc.wait_ready()
        os.kill(svc.health()["backend"]["pid"], signal.SIGKILL)

        def refused() -> tuple[int, int] | None:
            r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                              timeout=10)
            # until the gateway has read the new state, a request meets a refused connection
            return (r.status_code, int(r.headers["Retry-After"])) if "circuit_open" in r.text \
                else None

        status, retry_after = wait_for(refused, "the gateway to see the open circuit", within=30)
        assert status == 503 and 50 <= retry_after <= 60, retry_after
    finally:
        assert svc.stop() == 0


def test_corrupt_model_fails_startup_with_llama_server_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    svc = Service(tmp_path, {"MODEL_PATH": str(bad), "AUTH_ENABLED": "false"}).start()
    code = svc.wait_exit(60)
    log = svc.log()
    assert code == 1
    assert "backend failed to start" in log
    assert "last lines of llama-server's log" in log
    assert "bad.gguf" in log


def test_missing_model_fails_startup_clearly(tmp_path: Path) -> None:
    svc = Service(tmp_path, {"MODEL_PATH": str(tmp_path / "nope.gguf"),
                             "AUTH_ENABLED": "false"}).start()
    assert svc.wait_exit(60) == 1
    assert "model file not found" in svc.log()
    assert "nope.gguf" in svc.log()


def test_bad_setting_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    svc = Service(tmp_path, {"PORT_HEALTH": "eighty", "CTX": "-1"}).start()
    assert svc.wait_exit(30) == 2
    log = svc.log()
    assert "PORT_HEALTH='eighty'" in log and "CTX='-1'" in log


def test_metrics_cover_the_services_processes_and_build(service: Service) -> None:
    samples = Samples.parse(requests.get(service.url + "/metrics", timeout=10).text)
    health = service.health()
    for process in ("serve", "gateway", "llama-server"):
        assert samples.total("llamagate_process_resident_memory_bytes", process=process) > 0
    llama_pid = str(health["backend"]["pid"])
    assert samples.total("llamagate_process_cpu_seconds_total", pid=llama_pid) >= 0
    assert samples.total("llamagate_process_resident_memory_bytes", pid=llama_pid) > 0
    assert samples.get_value("llamagate_backend_restarts_total") == 0
    assert 0 < (samples.get_value("llamagate_backend_load_seconds") or 0) < 60
    builds = [dict(labels) for (name, labels) in samples if name == "llamagate_build_info"]
    assert len(builds) == 1 and builds[0]["llama_cpp"].startswith("b")
    assert builds[0]["version"] and builds[0]["cuda"] == "none"
