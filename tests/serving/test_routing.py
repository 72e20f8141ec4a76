"""Router mode with two tiny models (two .gguf files in MODELS_DIR, no profile) and
MAX_LOADED_MODELS=1: routing by model, listings, least-recently-used unloading, loading on
demand, and the admin model routes (scope, validation, load/unload, audit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from llamagate.tiny_model import write_model
from tests.health.processes import children, cmdline
from tests.support.keytool import KeyTool
from tests.support.service import Service
from tests.support.wait import wait_for

from .support import (
    admin,
    auth_env,
    chat,
    health_states,
    service_dir,
    serving_states,
    v1_model_ids,
    wait_state,
    write_models,
)

pytestmark = pytest.mark.llama_server  # every test here runs the real binary


@pytest.fixture(scope="module")
def keys(keytool: KeyTool) -> dict[str, tuple[str, str]]:
    return {
        "ops": keytool.generate("ops", "--scopes", "inference,admin,metrics"),
        "app": keytool.generate("app"),
        "alpha_only": keytool.generate("alpha-only", "--models", "alpha"),
    }


@pytest.fixture(scope="module")
def svc(keytool: KeyTool, keys: dict[str, tuple[str, str]]) -> Iterator[Service]:
    tmp = service_dir(keytool)
    write_models(tmp / "models", "alpha", "beta")
    # context shift: a generation runs until it is stopped, so a test can see it stop
    service = Service(tmp, {**auth_env(keytool), "MODELS_DIR": str(tmp / "models"),
                            "MAX_LOADED_MODELS": "1", "EXTRA_ARGS": "--context-shift"})
    with service.running():
        yield service


@pytest.fixture(scope="module")
def ops(keys: dict[str, tuple[str, str]]) -> str:
    return keys["ops"][1]


def content(r: requests.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_router_mode_serves_every_model_in_models_dir(svc: Service, ops: str) -> None:
    listing = admin(svc, "GET", "/admin/models", ops).json()
    assert listing["mode"] == "router" and listing["profile"] is None
    assert sorted(e["name"] for e in listing["data"]) == ["alpha", "beta"]
    assert svc.health()["model_states"].keys() == {"alpha", "beta"}


def test_each_name_answers_as_itself(svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    app = keys["app"][1]
    replies = {}
    for model in ("alpha", "beta"):
        r = chat(svc, model, app)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        replies[model] = content(r)
    # greedy decoding of two different random models: the same prompt, different text
    assert replies["alpha"] != replies["beta"]
    assert content(chat(svc, "alpha", app)) == replies["alpha"]  # and it is deterministic


def test_unknown_model_is_an_openai_404_listing_the_names(
        svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    r = chat(svc, "gamma", keys["app"][1])
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gamma" in error["message"] and "alpha, beta" in error["message"]


def test_v1_models_lists_what_the_key_may_use(svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    r = requests.get(f"{svc.url}/v1/models", headers={"Authorization": f"Bearer {keys['app'][1]}"},
                     timeout=10)
    body = r.json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["alpha", "beta"]
    assert all(m["object"] == "model" and "value" in m["status"] for m in body["data"])
    assert v1_model_ids(svc, keys["alpha_only"][1]) == ["alpha"]
    assert chat(svc, "beta", keys["alpha_only"][1]).status_code == 403
    assert chat(svc, "alpha", keys["alpha_only"][1]).status_code == 200


def test_loading_a_second_model_unloads_the_least_recently_used(
        svc: Service, ops: str, keys: dict[str, tuple[str, str]]) -> None:
    app = keys["app"][1]
    assert chat(svc, "alpha", app).status_code == 200
    wait_state(svc, ops, "alpha", "loaded")
    assert chat(svc, "beta", app).status_code == 200
    wait_state(svc, ops, "alpha", "unloaded")
    assert serving_states(svc, ops)["beta"]["state"] == "loaded"
    wait_for(lambda: health_states(svc) == {"alpha": "unloaded", "beta": "loaded"},
             "/health to show alpha unloaded, beta loaded", within=10)


def test_a_request_for_an_unloaded_model_waits_for_it(
        svc: Service, ops: str, keys: dict[str, tuple[str, str]]) -> None:
    wait_state(svc, ops, "alpha", "unloaded")  # left so by the test above
    r = chat(svc, "alpha", keys["app"][1])
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "alpha" and r.json()["usage"]["completion_tokens"] == 8
    wait_state(svc, ops, "alpha", "loaded")


def test_admin_routes_need_the_admin_scope(svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    app = keys["app"][1]
    for method, path, body in [("GET", "/admin/models", None),
                               ("POST", "/admin/models/alpha/unload", None),
                               ("PUT", "/admin/models/alpha", {"tier": "fast"}),
                               ("POST", "/admin/pull", {"repo": "a/b", "file": "c.gguf"}),
                               ("GET", "/admin/jobs", None),
                               ("PUT", "/admin/profile", {"profile": None})]:
        r = admin(svc, method, path, app, body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("permission_error", "missing_scope")
        assert "admin" in error["message"]
        assert requests.request(method, f"{svc.url}{path}", json=body, timeout=10).status_code == 401
    # nothing changed on the way: the model is not fast now
    entry = next(e for e in admin(svc, "GET", "/admin/models", keys["ops"][1]).json()["data"]
                 if e["name"] == "alpha")
    assert entry["override"].get("tier") is None


def test_model_edits_are_validated(svc: Service, ops: str) -> None:
    r = admin(svc, "PUT", "/admin/models/alpha", ops, {"ctx_size": "big", "parallel": 0})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "ctx_size" in message and "parallel" in message
    # argv the router's preset cannot hold is refused before it is saved
    r = admin(svc, "PUT", "/admin/models/alpha", ops, {"extra_args": ["chatml"]})
    assert r.status_code == 400, r.text
    assert "extra_args" in r.json()["error"]["message"]
    r = admin(svc, "PUT", "/admin/models/alpha", ops, "not an object")
    assert r.status_code == 400
    r = admin(svc, "PUT", "/admin/models/gamma", ops, {"tier": "fast"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "no model named 'gamma'"
    alpha = next(e for e in admin(svc, "GET", "/admin/models", ops).json()["data"]
                 if e["name"] == "alpha")
    assert alpha["override"].get("extra_args") in (None, [])
    assert alpha["override"].get("ctx_size") is None

    r = admin(svc, "PUT", "/admin/models/alpha", ops, {"tier": "fast", "tags": ["chat"]})
    assert r.status_code == 200, r.text
    assert r.json()["override"]["tier"] == "fast"
    # still served under the same name, and still answering
    assert chat(svc, "alpha", ops).status_code == 200


def test_load_and_unload_by_hand(svc: Service, ops: str) -> None:
    assert admin(svc, "POST", "/admin/models/gamma/load", ops).status_code == 404
    r = admin(svc, "POST", "/admin/models/beta/load", ops)
    assert r.status_code == 202, r.text
    assert r.json() == {"model": "beta", "action": "load", "accepted": True}
    wait_state(svc, ops, "beta", "loaded")
    wait_state(svc, ops, "alpha", "unloaded")  # MAX_LOADED_MODELS=1
    assert admin(svc, "POST", "/admin/models/beta/load", ops).status_code == 202  # already: fine
    r = admin(svc, "POST", "/admin/models/beta/unload", ops)
    assert r.status_code == 202, r.text
    wait_state(svc, ops, "beta", "unloaded")
    assert admin(svc, "POST", "/admin/models/beta/unload", ops).status_code == 202  # idempotent
    wait_for(lambda: health_states(svc) == {"alpha": "unloaded", "beta": "unloaded"},
             "/health to show both unloaded", within=10)


def test_changes_are_audited_with_the_acting_key(
        svc: Service, keytool: KeyTool, keys: dict[str, tuple[str, str]]) -> None:
    ops_id = keys["ops"][0]

    def entries() -> list[dict[str, Any]]:
        return [e for e in json.loads(keytool.ok("audit", "--json")) if e["actor"] == ops_id]

    def actions() -> set[tuple[str, str | None]]:
        return {(e["action"], e["target"]) for e in entries()}

    wait_for(lambda: {("edit_model", "alpha"), ("load_model", "beta"), ("unload_model", "beta")}
             <= actions(), "the audit entries", within=10)
    refused = [e for e in entries() if e["action"] == "edit_model" and e["detail"]["status"] == 400]
    assert refused, entries()
    # reads are not audited, and the refused inference key did nothing auditable
    assert not [e for e in json.loads(keytool.ok("audit", "--json")) if e["actor"] == keys["app"][0]]


def test_a_rescan_changes_the_served_set(svc: Service, ops: str, keytool: KeyTool) -> None:
    """Runs last in this module: the served set gains, then loses, a model."""
    models_dir = service_dir(keytool) / "models"
    write_model(models_dir / "gamma.gguf", seed=3)
    assert "gamma" not in v1_model_ids(svc, ops)  # nothing happens before a rescan
    r = admin(svc, "POST", "/admin/models/rescan", ops)
    assert r.status_code == 200, r.text
    assert "gamma" in [e["name"] for e in r.json()["data"]]
    wait_for(lambda: v1_model_ids(svc, ops) == ["alpha", "beta", "gamma"], "gamma to be served", within=10)
    r = chat(svc, "gamma", ops)
    assert r.status_code == 200 and r.json()["model"] == "gamma"

    (models_dir / "gamma.gguf").unlink()
    assert admin(svc, "POST", "/admin/models/rescan", ops).status_code == 200
    wait_for(lambda: v1_model_ids(svc, ops) == ["alpha", "beta"], "gamma to be gone", within=10)
    assert chat(svc, "gamma", ops).status_code == 404
    assert "gamma" not in health_states(svc)


def _processing(svc: Service, secret: str, model: str) -> float | None:
    """llama-server's own requests_processing for `model`, as merged into the gateway's /metrics."""
    text = requests.get(f"{svc.url}/metrics", headers={"Authorization": f"Bearer {secret}"},
                        timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llamacpp_requests_processing" and sample.labels.get("model") == model:
                return float(sample.value)
    return None


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_the_slot_through_the_router(
        svc: Service, ops: str, stream: bool) -> None:
    # no max_tokens: llama-server generates until stopped (a max_tokens over CTX is a 400 now)
    body = json.dumps({"model": "beta", "messages": [{"role": "user", "content": "go on"}],
                       "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", svc.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + ops.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        wait_for(lambda: _processing(svc, ops, "beta") == 1, "the generation to run", within=30)
    finally:
        sock.close()
    hung_up = time.monotonic()
    wait_for(lambda: _processing(svc, ops, "beta") == 0, "the slot to be freed", within=10)
    assert time.monotonic() - hung_up < 1.0, "the router's child still generated 1 s after the hang-up"


def test_a_model_that_crashes_after_loading_is_loaded_again_not_cooled_down(
        svc: Service, ops: str) -> None:
    """A cooldown is for a model that fails to load; one that ran and died (killed, out of
    memory) is loaded again by its next request."""
    assert chat(svc, "beta", ops).status_code == 200
    wait_state(svc, ops, "beta", "loaded")
    assert svc.proc is not None
    [child] = [pid for pid in children(svc.proc.pid)
               if any("beta" in arg for arg in cmdline(pid)) and "llama-server" in cmdline(pid)[0]]
    os.kill(child, signal.SIGKILL)
    crashed = wait_state(svc, ops, "beta", "failed")
    assert "after it had loaded" in crashed["reason"]
    r = chat(svc, "beta", ops)
    assert r.status_code == 200, r.text
    wait_state(svc, ops, "beta", "loaded")
