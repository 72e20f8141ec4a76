"""BACKEND_URL: a llama-server we do not run, started after the gateway and restarted
under another name. Its key reaches the workers in a file only; its model list is read
whenever it comes up, and no name is accepted (or counted) before that. Serving one model,
it answers to any name (issue 26), under that model's name."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from backend.argv import ServerSpec, build_argv
from core import runtime
from tests.health.processes import children, cmdline, runtime_dir
from tests.support.llama import stop
from tests.support.service import Service, free_port, llama_server
from tests.support.wait import wait_for

from .support import chat

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


@contextlib.contextmanager
def external(tmp: Path, model: Path, port: int, key_file: Path, alias: str) -> Iterator[None]:
    """A llama-server of our own on `port`, demanding the key in `key_file`."""
    spec = ServerSpec(binary=llama_server(), model_path=model, alias=alias, port=port,
                      api_key_file=key_file, ctx=2048, parallel=1, threads=1)
    with open(tmp / f"llama-server-{alias}.log", "wb") as log:
        proc = subprocess.Popen(build_argv(spec), stdout=log, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            stop(proc)


def test_a_late_backend_is_picked_up_with_its_models_and_its_key_stays_off_argv(
        tmp_path: Path, tiny_model: Path) -> None:
    key = secrets.token_urlsafe(24)
    key_file = tmp_path / "backend.key"
    runtime.write_secret(key_file, key)
    port = free_port()
    svc = Service(tmp_path, {"BACKEND_URL": f"http://127.0.0.1:{port}", "BACKEND_API_KEY": key,
                             "AUTH_ENABLED": "false"}).start()
    try:
        wait_for(svc.gateway_up, "the gateway port", within=30)
        wait_for(lambda: svc.ping() == 503, "the backend seen unreachable", within=30)
        # before its list is known no name is accepted, so none becomes a label value
        r = chat(svc, "client-chosen-name")
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        assert "client-chosen-name" not in requests.get(f"{svc.url}/metrics", timeout=5).text
        assert svc.proc is not None
        _assert_key_only_in_a_private_file(svc.proc.pid, key)

        with external(tmp_path, tiny_model, port, key_file, "tiny"):
            svc.wait_ready()
            r = chat(svc, "no-such-model")  # one model: any name reaches it, as direct
            assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
            r = chat(svc, "tiny")  # the backend demands the key: the gateway sent it
            assert r.status_code == 200, r.text
            assert svc.health()["models"] == ["tiny"]
        metrics = requests.get(f"{svc.url}/metrics", timeout=5).text
        assert "no-such-model" not in metrics

        # back from an outage serving another model: the list is read again
        wait_for(lambda: svc.ping() == 503, "the outage to be seen", within=30)
        with external(tmp_path, tiny_model, port, key_file, "tiny-2"):
            svc.wait_ready()
            assert chat(svc, "tiny-2").status_code == 200
            assert svc.health()["models"] == ["tiny-2"]
            r = chat(svc, "tiny")  # the name of the model it served before reaches this one
            assert r.status_code == 200 and r.json()["model"] == "tiny-2", r.text
        metrics = requests.get(f"{svc.url}/metrics", timeout=5).text
        assert 'model="tiny-2"' in metrics
        _assert_key_only_in_a_private_file(svc.proc.pid, key)
    finally:
        assert svc.stop() == 0
    assert key not in svc.log()


def _assert_key_only_in_a_private_file(serve_pid: int, key: str) -> None:
    pids = children(serve_pid)
    assert any("gateway.worker" in cmdline(pid) for pid in pids)
    for pid in pids:  # `ps` shows these to every user
        assert key not in "\0".join(cmdline(pid)), cmdline(pid)
    for pid in pids:  # no child needs it there
        assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), cmdline(pid)
    key_file = runtime_dir(serve_pid) / "backend.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().strip() == key
