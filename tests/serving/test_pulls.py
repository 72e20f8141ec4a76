"""Pulls over the admin API from a fake Hugging Face Hub (HF_ENDPOINT), with the service in
single-model mode: progress, rescan on success, shared jobs, cancel, failures, refused
paths, the audit log, and a kill -9 of the serve process mid-download then a resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamagate.tiny_model import write_model
from tests.backend.models.fakehub import FakeHub
from tests.support.keytool import KeyTool
from tests.support.service import Service
from tests.support.wait import wait_for

from .support import HubThread, admin, auth_env, service_dir

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

BIG = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def files(hub: HubThread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, str]]:
    """name → (bytes, sha256) of each file put on the fake Hub."""
    tiny = write_model(tmp_path_factory.mktemp("hubsrc") / "pulled.gguf", seed=5).read_bytes()
    content = {"pulled.gguf": tiny, "cancel.gguf": os.urandom(BIG), "resume.gguf": os.urandom(BIG)}
    out = {}
    for name, data in content.items():
        repo = "org/tiny-gguf" if name == "pulled.gguf" else "org/big"
        out[name] = (data, hub.hub.add_file(repo, name, data))
    return out


@pytest.fixture(scope="module")
def ops_key(keytool: KeyTool) -> tuple[str, str]:
    return keytool.generate("ops", "--scopes", "inference,admin")


@pytest.fixture(scope="module")
def ops(ops_key: tuple[str, str]) -> str:
    return ops_key[1]


@pytest.fixture(scope="module")
def env(keytool: KeyTool, hub: HubThread, tiny_model: Path) -> dict[str, str]:
    models = service_dir(keytool) / "models"
    models.mkdir()
    return {**auth_env(keytool), "MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
            "MODELS_DIR": str(models), "HF_ENDPOINT": hub.hub.endpoint, "PULL_RETRIES": "1"}


@pytest.fixture(scope="module")
def svc(keytool: KeyTool, env: dict[str, str], ops: str,
        files: dict[str, tuple[bytes, str]]) -> Iterator[Service]:
    service = Service(service_dir(keytool), env)
    with service.running():
        yield service


@pytest.fixture(scope="module")
def models_dir(env: dict[str, str]) -> Path:
    return Path(env["MODELS_DIR"])


def throttle(hub: FakeHub, chunk: int, delay: float) -> None:
    hub.switches.chunk_size, hub.switches.chunk_delay_s = chunk, delay


def pull(svc: Service, ops: str, repo: str, file: str) -> dict[str, Any]:
    r = admin(svc, "POST", "/admin/pull", ops, {"repo": repo, "file": file})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def job(svc: Service, ops: str, job_id: str) -> dict[str, Any]:
    r = admin(svc, "GET", f"/admin/jobs/{job_id}", ops)
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def wait_job(svc: Service, ops: str, job_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = job(svc, ops, job_id)
        assert current["state"] == state or current["state"] in ("queued", "running"), current
        return current if current["state"] == state else None
    found: dict[str, Any] = wait_for(reached, f"job {job_id} to be {state}", within=timeout)
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(models_dir: Path) -> list[Path]:
    return sorted((models_dir / ".partial").glob("*.part"))


def test_a_pull_reports_progress_then_serves_the_new_model(
        svc: Service, ops: str, hub: HubThread, files: dict[str, tuple[bytes, str]],
        models_dir: Path) -> None:
    data, digest = files["pulled.gguf"]
    names = {e["name"] for e in admin(svc, "GET", "/admin/models", ops).json()["data"]}
    assert "pulled" not in names
    throttle(hub.hub, 8 * 1024, 0.06)  # ~2.5 s: long enough to see progress (sampled each 1 s)
    first = pull(svc, ops, "org/tiny-gguf", "pulled.gguf")
    assert first["state"] in ("queued", "running") and first["repo"] == "org/tiny-gguf"
    # the same file again, while the first is active: the same job
    assert pull(svc, ops, "org/tiny-gguf", "pulled.gguf")["id"] == first["id"]

    def in_progress() -> dict[str, Any] | None:
        current = job(svc, ops, first["id"])
        assert current["state"] in ("queued", "running"), current
        done, total = current["bytes_done"], current["bytes_total"]
        return current if current["state"] == "running" and total and 0 < done < total else None
    progress = wait_for(in_progress, "a progress report", within=20)
    assert progress["bytes_total"] == len(data)

    finished = wait_job(svc, ops, first["id"], "done")
    throttle(hub.hub, 64 * 1024, 0)
    assert finished["bytes_done"] == finished["bytes_total"] == len(data)
    assert finished["error"] is None and finished["paths"] == [str(models_dir / "pulled.gguf")]
    assert sha256(models_dir / "pulled.gguf") == digest
    listed = admin(svc, "GET", "/admin/jobs", ops).json()["data"]
    assert first["id"] in [j["id"] for j in listed]

    # a finished pull rescans MODELS_DIR: the model is in the registry
    def registered() -> dict[str, Any] | None:
        entries = admin(svc, "GET", "/admin/models", ops).json()["data"]
        return next((e for e in entries if e["name"] == "pulled"), None)
    entry = wait_for(registered, "the pulled model in /admin/models", within=10)
    assert entry["status"] == "ok" and entry["path"] == str(models_dir / "pulled.gguf")
    assert entry["metadata"]["architecture"] == "llama"
    # a later pull of the same file is a new job (the first one is over)
    again = pull(svc, ops, "org/tiny-gguf", "pulled.gguf")
    assert again["id"] != first["id"]
    assert wait_job(svc, ops, again["id"], "done")["paths"] == finished["paths"]


def test_a_pull_can_be_cancelled(svc: Service, ops: str, hub: HubThread, models_dir: Path) -> None:
    throttle(hub.hub, 16 * 1024, 0.05)  # 4 MiB at ~320 KB/s: far from done when cancelled
    started = pull(svc, ops, "org/big", "cancel.gguf")
    wait_for(lambda: partials(models_dir), "the download to start", within=20)
    r = admin(svc, "DELETE", f"/admin/jobs/{started['id']}", ops)
    throttle(hub.hub, 64 * 1024, 0)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled"
    assert job(svc, ops, started["id"])["state"] == "cancelled"
    wait_for(lambda: not partials(models_dir), "the partial file to be deleted", within=10)
    assert not (models_dir / "cancel.gguf").exists()
    # cancelling a finished job changes nothing
    r = admin(svc, "DELETE", f"/admin/jobs/{started['id']}", ops)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert admin(svc, "DELETE", "/admin/jobs/no-such-job", ops).status_code == 404


def test_a_missing_repo_fails_the_job_with_a_reason(svc: Service, ops: str) -> None:
    started = pull(svc, ops, "org/nope", "model.gguf")
    failed = wait_job(svc, ops, started["id"], "failed")
    assert failed["error_code"] == "remote_not_found"
    assert "repository org/nope not found; check the id" in failed["error"]
    missing_file = wait_job(svc, ops, pull(svc, ops, "org/big", "absent.gguf")["id"], "failed")
    assert missing_file["error_code"] == "remote_not_found" and "absent.gguf" in missing_file["error"]


@pytest.mark.parametrize(("body", "code"), [
    ({"repo": "org/big", "file": "../escape.gguf"}, "unsafe_path"),
    ({"repo": "org/big", "file": "/etc/escape.gguf"}, "unsafe_path"),
    ({"repo": "org/big", "file": "sub/../../escape.gguf"}, "unsafe_path"),
    ({"repo": "not a repo", "file": "x.gguf"}, "bad_pull_request"),
    ({"repo": "org/big"}, "invalid_request"),
    ({"repo": "org/big", "file": "big.gguf", "pattern": "*.gguf"}, "invalid_request"),
])
def test_requests_that_can_never_work_are_refused(
        svc: Service, ops: str, body: dict[str, str], code: str, models_dir: Path) -> None:
    r = admin(svc, "POST", "/admin/pull", ops, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert not (models_dir.parent / "escape.gguf").exists()


def test_load_and_profiles_need_multi_model_mode(svc: Service, ops: str) -> None:
    for method, path, body in [("POST", "/admin/models/pulled/load", None),
                               ("POST", "/admin/models/pulled/unload", None),
                               ("PUT", "/admin/profile", {"profile": "x"})]:
        r = admin(svc, method, path, ops, body)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["error"]["code"] == "not_multi_model"
        assert "single" in r.json()["error"]["message"]
    profile = admin(svc, "GET", "/admin/profile", ops).json()
    assert profile == {"mode": "single", "profile": None, "models": {}}
    # the single model keeps answering
    r = admin(svc, "POST", "/v1/chat/completions", ops,
              {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_pulls_are_audited_with_the_acting_key(
        svc: Service, keytool: KeyTool, ops_key: tuple[str, str]) -> None:
    def entries() -> list[dict[str, Any]]:
        return [e for e in json.loads(keytool.ok("audit", "--json")) if e["actor"] == ops_key[0]]
    wait_for(lambda: {"pull", "cancel_pull"} <= {e["action"] for e in entries()}, "audit entries", within=10)
    pulls = [e for e in entries() if e["action"] == "pull"]
    assert {(e["target"], e["detail"].get("file")) for e in pulls} >= {
        ("org/tiny-gguf", "pulled.gguf"), ("org/big", "cancel.gguf"), ("org/nope", "model.gguf")}
    assert {e["detail"]["status"] for e in pulls} == {202, 400}


def test_a_pull_survives_kill_9_of_the_serve_process(
        svc: Service, ops: str, hub: HubThread, keytool: KeyTool, env: dict[str, str],
        files: dict[str, tuple[bytes, str]], models_dir: Path) -> None:
    """Runs last: it kills the module's service, then starts another on the same data."""
    _, digest = files["resume.gguf"]
    throttle(hub.hub, 16 * 1024, 0.02)  # ~800 KB/s: about 5 s for the whole file
    started = pull(svc, ops, "org/big", "resume.gguf")
    partial = models_dir / ".partial" / f"{digest}.part"
    wait_for(lambda: partial.exists() and partial.stat().st_size >= BIG // 4,
             "a quarter of the file on disk", within=30)
    assert svc.proc is not None
    os.kill(svc.proc.pid, signal.SIGKILL)
    assert svc.wait_exit(10) == -signal.SIGKILL
    on_disk = partial.stat().st_size
    assert BIG // 4 <= on_disk < BIG
    served_before = hub.hub.body_bytes()
    throttle(hub.hub, 64 * 1024, 0)

    again = Service(service_dir(keytool), env).start()
    try:
        again.wait_ready()
        done = wait_job(again, ops, started["id"], "done")
        assert done["bytes_done"] == BIG
        assert sha256(models_dir / "resume.gguf") == digest
        # resumed from the bytes on disk, not downloaded again
        assert hub.hub.body_bytes() - served_before == BIG - on_disk
        assert f"bytes={on_disk}-" in [s.range for s in hub.hub.log]
        assert not partials(models_dir)
    finally:
        assert again.stop() == 0
