"""A profile with a model llama-server cannot load: cooldown, fallback, 503, the state in
/admin/models and /metrics; then profile validation and switching, over the admin API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.keytool import KeyTool
from tests.support.metrics import Samples, promtool_check
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
    write_broken_model,
    write_models,
)

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

COOLDOWN = 30
PROFILES = """\
profiles:
  main:
    models:
      - model: alpha
      - model: beta
        preload: true
      - model: broken
        fallback: alpha
      - model: broken
        alias: nofb
  solo:
    models:
      - model: alpha
"""
MAIN = ["alpha", "beta", "broken", "nofb"]


@pytest.fixture(scope="module")
def ops(keytool: KeyTool) -> str:
    return keytool.generate("ops", "--scopes", "inference,admin")[1]


@pytest.fixture(scope="module")
def profiles_file(keytool: KeyTool) -> Path:
    path = service_dir(keytool) / "profiles.yaml"
    path.write_text(PROFILES)
    return path


@pytest.fixture(scope="module")
def svc(keytool: KeyTool, ops: str, profiles_file: Path) -> Iterator[Service]:
    tmp = service_dir(keytool)
    write_models(tmp / "models", "alpha", "beta")
    write_broken_model(tmp / "models" / "broken.gguf")
    service = Service(tmp, {**auth_env(keytool), "MODELS_DIR": str(tmp / "models"),
                            "PROFILES_FILE": str(profiles_file), "PROFILE": "main",
                            "MAX_LOADED_MODELS": "4", "METRICS_PUBLIC": "true",
                            "MODEL_COOLDOWN_SECONDS": str(COOLDOWN)})
    with service.running():
        yield service


def test_the_profile_is_served(svc: Service, ops: str) -> None:
    profile = admin(svc, "GET", "/admin/profile", ops).json()
    assert profile["mode"] == "router" and profile["profile"] == "main"
    assert sorted(profile["models"]) == MAIN
    assert profile["models"]["broken"]["fallback"] == "alpha"
    wait_state(svc, ops, "beta", "loaded")  # preload: true, and no request asked for it
    assert serving_states(svc, ops)["alpha"]["state"] == "unloaded"
    assert v1_model_ids(svc, ops) == MAIN
    health = svc.health()
    assert health["profile"] == "main" and sorted(health["model_states"]) == MAIN
    # the broken file passes the registry's header read: only llama-server can tell
    broken = next(e for e in admin(svc, "GET", "/admin/models", ops).json()["data"]
                  if e["name"] == "broken")
    assert broken["status"] == "ok" and broken["servable"] is True
    assert sorted(s["name"] for s in broken["serving"]) == ["broken", "nofb"]


def test_a_failed_load_cools_down_and_the_fallback_answers(svc: Service, ops: str) -> None:
    direct = chat(svc, "alpha", ops)
    assert direct.status_code == 200 and "X-Model-Fallback" not in direct.headers

    # the request that finds the model broken is answered by the fallback too
    first = chat(svc, "broken", ops)
    assert first.status_code == 200, first.text
    assert first.headers["X-Model-Fallback"] == "alpha" and first.json()["model"] == "alpha"
    state = wait_state(svc, ops, "broken", "cooldown")
    assert state["fallback"] == "alpha" and 0 < state["retry_in"] <= COOLDOWN
    assert state["reason"] and "exited with code" in state["reason"]

    # the gateway follows the published state; from then on the fallback answers
    def via_fallback() -> requests.Response | None:
        r = chat(svc, "broken", ops)
        return r if r.headers.get("X-Model-Fallback") == "alpha" else None
    r: requests.Response = wait_for(via_fallback, "requests for broken to get the fallback", within=10)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "alpha"
    assert r.json()["choices"][0]["message"]["content"] == direct.json()["choices"][0]["message"]["content"]

    with requests.post(f"{svc.url}/v1/chat/completions", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {ops}"},
                       json={"model": "broken", "stream": True, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]}) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["X-Model-Fallback"] == "alpha"
        assert b"[DONE]" in streamed.content
    # still cooling down: the fallback answering did not end it
    assert serving_states(svc, ops)["broken"]["state"] == "cooldown"


def test_without_a_fallback_a_cooling_model_is_refused(svc: Service, ops: str) -> None:
    first = chat(svc, "nofb", ops)  # finds it broken: the same 503 as those that follow
    assert first.status_code == 503, first.text
    assert first.json()["error"]["code"] == "model_unavailable"
    assert 1 <= int(first.headers["Retry-After"]) <= COOLDOWN
    state = wait_state(svc, ops, "nofb", "cooldown")
    assert state["fallback"] is None and state["reason"]

    def refused() -> list[requests.Response]:
        r = chat(svc, "nofb", ops)  # (a Response is falsy unless 2xx: return it in a list)
        return [r] if r.status_code == 503 else []
    [r] = wait_for(refused, "requests for nofb to be refused", within=10)
    error = r.json()["error"]
    assert error["code"] == "model_unavailable" and "nofb" in error["message"]
    assert "X-Model-Fallback" not in r.headers
    assert 1 <= int(r.headers["Retry-After"]) <= COOLDOWN
    assert health_states(svc)["nofb"] == "cooldown"


def test_model_state_metrics(svc: Service, ops: str) -> None:
    assert chat(svc, "beta", ops).status_code == 200
    wait_state(svc, ops, "beta", "loaded")
    wait_state(svc, ops, "alpha", "loaded")

    def scrape() -> str | None:
        text = requests.get(f"{svc.url}/metrics", timeout=10).text
        samples = Samples.parse(text)
        ready = all(samples.get_value("llamagate_model_state", model=m, state="loaded") == 1
                    for m in ("alpha", "beta"))
        return text if ready else None
    text: str = wait_for(scrape, "/metrics to show alpha and beta loaded", within=10)
    samples = Samples.parse(text)
    assert samples.get_value("llamagate_model_state", model="broken", state="cooldown") == 1
    assert samples.get_value("llamagate_model_state", model="broken", state="loaded") == 0
    # llama-server's own metrics of each loaded model, one family declaration for both
    labelled = {labels for name, labels in samples if name == "llamacpp_prompt_tokens_total"}
    assert {dict(labels).get("model") for labels in labelled} >= {"alpha", "beta"}
    assert text.count("# TYPE llamacpp_prompt_tokens_total ") == 1
    promtool_check(text)


def test_an_operator_load_retries_at_once(svc: Service, ops: str) -> None:
    before = serving_states(svc, ops)["broken"]
    assert before["state"] == "cooldown"
    r = admin(svc, "POST", "/admin/models/broken/load", ops)
    assert r.status_code == 202, r.text
    # the retry fails again, and starts a new, full cooldown
    wait_for(lambda: (s := serving_states(svc, ops)["broken"])["state"] == "cooldown"
             and s["cooldown_until"] > before["cooldown_until"], "a new cooldown", within=10)


def put_profile(svc: Service, ops: str, name: str | None) -> requests.Response:
    return admin(svc, "PUT", "/admin/profile", ops, {"profile": name})


@pytest.mark.parametrize(("edit", "line", "field", "words"), [
    (("      - model: beta\n", "      - model: gamma\n"), 5, "profiles.main.models[1].model",
     "unknown model 'gamma'"),
    (("      - model: beta\n", "      - model: beta\n        colour: red\n"), 6,
     "profiles.main.models[1].colour", "unknown key"),
    (("      - model: beta\n", "      - model: beta\n        ctx_size: big\n"), 6,
     "profiles.main.models[1].ctx_size", "integer"),
])
def test_a_bad_profile_is_refused_by_line_and_field(
        svc: Service, ops: str, profiles_file: Path, edit: tuple[str, str], line: int, field: str,
        words: str) -> None:
    before = admin(svc, "GET", "/admin/profile", ops).json()
    profiles_file.write_text(PROFILES.replace(*edit, 1))
    try:
        r = put_profile(svc, ops, "main")
    finally:
        profiles_file.write_text(PROFILES)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_profile"
    assert [(p["line"], p["field"]) for p in error["problems"]] == [(line, field)]
    assert words in error["problems"][0]["message"]
    assert f"{profiles_file}:{line}: {field}: " in error["message"]
    after = admin(svc, "GET", "/admin/profile", ops).json()
    assert after["profile"] == "main" and sorted(after["models"]) == sorted(before["models"])
    assert v1_model_ids(svc, ops) == MAIN


def test_other_refused_switches_keep_the_running_profile(
        svc: Service, ops: str, profiles_file: Path) -> None:
    r = put_profile(svc, ops, "nightly")
    assert r.status_code == 404 and r.json()["error"]["code"] == "profile_not_found"
    assert "main, solo" in r.json()["error"]["message"]
    assert put_profile(svc, ops, 7).status_code == 400  # type: ignore[arg-type]
    # settings that pass the profile's checks but cannot become a router preset
    solo = "  solo:\n    models:\n      - model: alpha\n"
    assert PROFILES.endswith(solo)
    profiles_file.write_text(PROFILES.replace(solo, solo + '        extra_args: ["chatml"]\n'))
    try:
        r = put_profile(svc, ops, "solo")
    finally:
        profiles_file.write_text(PROFILES)
    assert r.status_code == 400, r.text
    assert "chatml" in r.json()["error"]["message"]
    assert admin(svc, "GET", "/admin/profile", ops).json()["profile"] == "main"
    assert v1_model_ids(svc, ops) == MAIN


def test_switching_profiles_changes_the_served_models(
        svc: Service, ops: str, keytool: KeyTool) -> None:
    r = put_profile(svc, ops, "solo")
    assert r.status_code == 200, r.text
    assert r.json()["profile"] == "solo" and list(r.json()["models"]) == ["alpha"]
    wait_for(lambda: v1_model_ids(svc, ops) == ["alpha"], "/v1/models to follow the switch", within=10)
    assert svc.health()["profile"] == "solo"
    assert chat(svc, "alpha", ops).status_code == 200
    assert chat(svc, "beta", ops).status_code == 404
    switches = [e for e in json.loads(keytool.ok("audit", "--json")) if e["action"] == "switch_profile"]
    assert {(e["target"], e["detail"]["status"]) for e in switches} >= {("solo", 200), ("main", 400)}
