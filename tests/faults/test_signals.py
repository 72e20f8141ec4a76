"""Signals to `llamagate serve` and its children, with the real llama-server.

A SIGHUP to serve's whole process group (a terminal hangup, `tini -g`, `kill -HUP -- -PGID`)
reaches serve, the health process and the gateway workers at once. It must harm none of
them: with auth on the workers reload the keys file, with auth off it is ignored, and
llama-server (its own session) ignores it too. A child that dies anyway is logged and
restarted, the health process included. serve names its runtime directory in its log.

Each service runs in its own session (``Service(own_group=True)``) so the test can signal
serve's process group without signalling the test runner.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.health.processes import children, cmdline, runtime_dir
from tests.support.keytool import KeyTool
from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

SIGHUP_BIT = 1 << (signal.SIGHUP - 1)  # its bit in /proc/PID/status's signal masks


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyTool:
    data = tmp_path_factory.mktemp("signals") / "data"
    return KeyTool(data / "keys.json", data / "usage.db")


@pytest.fixture(scope="module")
def svc(store: KeyTool, tiny_model: Path) -> Iterator[Service]:
    store.generate("first")  # a key file to start with
    service = Service(store.keys_file.parent.parent, {
        "MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny", "AUTH_ENABLED": "true",
        "AUTH_KEYS_FILE": str(store.keys_file), "USAGE_DB": str(store.usage_db),
        "KEYS_RELOAD_INTERVAL": "0"},  # polling off: only a SIGHUP makes a new key known
        own_group=True)
    with service.running():
        yield service


def _pid(svc: Service) -> int:
    assert svc.proc is not None
    return svc.proc.pid


def _sighup_handled_or_ignored(pid: int) -> bool:
    """Whether a SIGHUP would leave `pid` alive: caught by a handler, or ignored."""
    masks = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("SigIgn", "SigCgt"):
            masks[name] = int(value, 16)
    return bool((masks["SigIgn"] | masks["SigCgt"]) & SIGHUP_BIT)


def _tree(svc: Service) -> dict[int, str]:
    """serve and every process under it (health, workers, llama-server), by pid."""
    serve = _pid(svc)
    return {pid: " ".join(cmdline(pid)) for pid in [serve, *children(serve)]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a dead child not yet reaped is a zombie: dead all the same
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def _health_pid(svc: Service) -> int | None:
    found = [pid for pid in children(_pid(svc)) if "health.server" in cmdline(pid)]
    return found[0] if len(found) == 1 else None


def _entries(svc: Service) -> list[dict[str, Any]]:
    return [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]


def _models_status(svc: Service, secret: str | None) -> int:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return requests.get(f"{svc.url}/v1/models", headers=headers, timeout=10).status_code


def _chat(svc: Service, secret: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    r = requests.post(f"{svc.url}/v1/chat/completions", headers=headers, timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _crashes(svc: Service) -> list[dict[str, Any]]:
    return [e for e in _entries(svc)
            if e.get("logger") == "llamagate.serve" and "exited unexpectedly" in e.get("msg", "")]


def _sighup_the_group(svc: Service) -> dict[int, str]:
    """SIGHUP to serve's process group; returns the process tree as it was just before."""
    tree = _tree(svc)
    # Deterministic half of the check: no process in the tree would die of a SIGHUP.
    assert [cmd for pid, cmd in tree.items() if not _sighup_handled_or_ignored(pid)] == []
    assert os.getpgid(_pid(svc)) == _pid(svc)  # serve leads the group, not the test runner
    os.killpg(_pid(svc), signal.SIGHUP)
    return tree


def _nothing_died(svc: Service, tree: dict[int, str], backend_pid: int) -> None:
    assert [cmd for pid, cmd in tree.items() if not _alive(pid)] == []
    assert svc.ping() == 200
    backend = svc.health()["backend"]
    assert (backend["pid"], backend["restarts"]) == (backend_pid, 0)  # not restarted
    assert _crashes(svc) == []


def test_sighup_to_the_process_group_reloads_keys_and_harms_nothing(
        svc: Service, store: KeyTool) -> None:
    backend_pid = svc.health()["backend"]["pid"]
    workers = svc.health()["workers"]
    _, secret = store.generate("made-after-start")
    assert _models_status(svc, secret) == 401  # polling is off: not known yet

    tree = _sighup_the_group(svc)
    wait_for(lambda: _models_status(svc, secret) == 200, "the workers to reload the keys",
             within=15)
    assert _chat(svc, secret)["usage"]["completion_tokens"] == 3
    _nothing_died(svc, tree, backend_pid)
    assert svc.health()["workers"] == workers


def test_a_killed_health_process_is_logged_and_restarted(svc: Service) -> None:
    health = _health_pid(svc)
    assert health is not None
    os.kill(health, signal.SIGKILL)

    def restarted() -> int | None:
        pid = _health_pid(svc)
        return pid if pid not in (None, health) and svc.ping() == 200 else None
    wait_for(restarted, "serve to restart the health process", within=15)
    [crash] = _crashes(svc)
    assert crash["level"] == "error"
    assert (crash["child"], crash["child_pid"], crash["signal"]) == ("health", health, "SIGKILL")


def test_serve_names_its_runtime_directory(svc: Service) -> None:
    named = [e["runtime_dir"] for e in _entries(svc)
             if e.get("logger") == "llamagate.serve" and e["level"] == "info" and "runtime_dir" in e]
    assert named == [str(runtime_dir(_pid(svc)))]
    assert named[0] in next(e["msg"] for e in _entries(svc) if "runtime_dir" in e)


def test_sighup_with_auth_off_is_ignored_by_every_process(tmp_path: Path, tiny_model: Path) -> None:
    service = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                                 "AUTH_ENABLED": "false"}, own_group=True)
    with service.running() as svc:
        backend_pid = svc.health()["backend"]["pid"]
        workers = svc.health()["workers"]
        tree = _sighup_the_group(svc)
        # serve says it ignored the signal: every process in the group had it by then
        wait_for(lambda: any("SIGHUP" in e.get("msg", "") for e in _entries(svc)),
                 "serve to log the SIGHUP", within=10)
        assert _chat(svc, None)["usage"]["completion_tokens"] == 3
        _nothing_died(svc, tree, backend_pid)
        assert svc.health()["workers"] == workers



def test_ctrl_c_drains_and_a_second_ctrl_c_cuts_the_drain_short(
        tmp_path: Path, tiny_model: Path) -> None:
    # Ctrl-C in a terminal sends SIGINT to the whole group: each worker gets it from the
    # terminal and serve's SIGTERM, in either order. That is one request to stop, not the
    # second signal that cuts the drain short; a second Ctrl-C is.
    service = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                                 "AUTH_ENABLED": "false", "SHUTDOWN_GRACE_SECONDS": "60",
                                 "CTX": "32768", "PARALLEL": "1"}, own_group=True)
    with service.running() as svc:
        with requests.post(f"{svc.url}/v1/chat/completions", stream=True, timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 30000, "stream": True}) as stream:
            assert stream.status_code == 200
            events = (line.decode() for line in stream.iter_lines() if line.startswith(b"data: "))
            assert "chat.completion.chunk" in next(events)
            os.killpg(_pid(svc), signal.SIGINT)
            wait_for(lambda: svc.ping() == 503, "/ping 503 (draining) after Ctrl-C", within=5)
            # still streaming well after the drain began (a cut stream ends in a few events)
            later = list(itertools.islice(events, 1000))
            assert len(later) == 1000 and not any('"error"' in e for e in later)
            assert "drain deadline" not in svc.log()  # a cut logs it at once
            os.killpg(_pid(svc), signal.SIGINT)
            rest = list(events)
        assert json.loads(rest[-1].removeprefix("data: "))["error"]["code"] == "shutting_down"
        assert len(rest) < 25000  # cut short, not run to its end
        assert svc.wait_exit(60) == 0
        assert _crashes(svc) == []
