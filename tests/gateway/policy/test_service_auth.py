"""Keys end to end: `llamagate serve` with the real llama-server, the OpenAI SDK, key_mgmt
changing keys while the service runs, SIGHUP, and logs checked for every secret."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import openai
import pytest
import requests

from tests.gateway.policy.bypass_paths import BYPASS_PATHS, CHAT_BODY
from tests.support.keytool import KeyTool
from tests.support.rawhttp import exchange
from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyTool:
    data = tmp_path_factory.mktemp("auth-service") / "data"
    return KeyTool(data / "keys.json", data / "usage.db")


@pytest.fixture(scope="module")
def keys(store: KeyTool) -> dict[str, tuple[str, str]]:
    return {
        "app": store.generate("app"),
        "ops": store.generate("ops", "--scopes", "admin"),
        "limited": store.generate("limited", "--rpm", "1"),
        "elsewhere": store.generate("elsewhere", "--models", "other"),
        "streamer": store.generate("streamer", "--rpm", "100", "--tpm", "100000"),
        "reloaded": store.generate("reloaded"),
    }


@pytest.fixture(scope="module")
def svc(store: KeyTool, keys: dict[str, tuple[str, str]], tiny_model: Path) -> Iterator[Service]:
    service = Service(store.keys_file.parent.parent, {
        "MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny", "AUTH_ENABLED": "true",
        "AUTH_KEYS_FILE": str(store.keys_file), "USAGE_DB": str(store.usage_db),
        "KEYS_RELOAD_INTERVAL": "0",  # so only SIGHUP and the admin endpoint reload
        "USAGE_FLUSH_INTERVAL": "0.1", "AUTH_FAILURES_PER_MINUTE": "1000"})
    with service.running():
        yield service


def client(svc: Service, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.url}/v1", api_key=secret, max_retries=0)


def status_with(svc: Service, secret: str) -> int:
    return requests.get(f"{svc.url}/v1/models", headers={"x-api-key": secret}, timeout=10).status_code


def test_sdk_outcomes(svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    reply = client(svc, keys["app"][1]).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        client(svc, "lg-not-a-real-key").chat.completions.create(model="tiny", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):
        client(svc, keys["elsewhere"][1]).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2)
    assert [m.id for m in client(svc, keys["elsewhere"][1]).models.list()] == []
    assert [m.id for m in client(svc, keys["app"][1]).models.list()] == ["tiny"]
    limited = client(svc, keys["limited"][1])
    limited.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)


def test_stream_carries_rate_limit_headers(svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    with requests.post(f"{svc.url}/v1/chat/completions", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {keys['streamer'][1]}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 6, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert r.headers["x-ratelimit-remaining-requests"] == "99"
        assert b"[DONE]" in r.content


async def test_bypass_variants_against_the_real_backend(svc: Service) -> None:
    sent: dict[str, str] = {}  # request id -> target
    for method in ("GET", "POST"):
        for n, target in enumerate(BYPASS_PATHS):
            rid = f"bypass-{method}-{n}"
            sent[rid] = target
            status, body = await exchange(svc.url, method, target, {"X-Request-ID": rid},
                                             CHAT_BODY)
            assert status in (401, 404), (method, target, status)
            assert body["error"]["type"] in ("authentication_error", "invalid_request_error")
    # The access log says whether a request got as far as the backend queue. Probe and
    # scrape paths are not logged, so expect a line for every other variant.
    quiet = {"/ping", "/health", "/metrics"}
    expected = {rid for rid, target in sent.items() if unquote(urlsplit(target).path) not in quiet}

    def access_lines() -> dict[str, dict[str, Any]]:
        entries = (json.loads(line) for line in svc.log().splitlines() if line.startswith("{"))
        return {e["request_id"]: e for e in entries
                if e.get("logger") == "llamagate.access" and e.get("request_id") in sent}

    wait_for(lambda: expected <= access_lines().keys(), "the access log lines", within=10)
    assert [rid for rid, e in access_lines().items() if e["queue_ms"] is not None] == []


def test_key_changes_apply_without_restart(
        svc: Service, store: KeyTool, keys: dict[str, tuple[str, str]]) -> None:
    key_id, secret = keys["reloaded"]
    ops = {"Authorization": f"Bearer {keys['ops'][1]}"}
    assert status_with(svc, secret) == 200
    store.ok("disable", key_id)
    assert status_with(svc, secret) == 200  # polling is off: nothing changes by itself
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGHUP)  # to `llamagate serve`, which tells its workers
    wait_for(lambda: status_with(svc, secret) == 401, "SIGHUP to reload the keys", within=30)

    store.ok("enable", key_id)
    r = requests.post(f"{svc.url}/admin/keys/reload", headers=ops, timeout=10)
    assert r.status_code == 200 and r.json()["ok"] is True
    assert status_with(svc, secret) == 200

    new = store.rotate(key_id, "0")
    requests.post(f"{svc.url}/admin/keys/reload", headers=ops, timeout=10).raise_for_status()
    assert (status_with(svc, secret), status_with(svc, new)) == (401, 200)
    assert svc.ping() == 200


def test_usage_reaches_the_database(svc: Service, keys: dict[str, tuple[str, str]]) -> None:
    app_id, app = keys["app"]
    client(svc, app).completions.create(model="tiny", prompt="a", max_tokens=3)
    r = requests.get(f"{svc.url}/admin/usage", params={"key": app_id, "since": "1h"}, timeout=10,
                     headers={"Authorization": f"Bearer {keys['ops'][1]}"})
    rows = r.json()["data"]
    assert sum(row["requests"] for row in rows) >= 2
    assert sum(row["completion_tokens"] for row in rows) >= 7


def test_no_secret_in_the_service_log(svc: Service, store: KeyTool,
                                      keys: dict[str, tuple[str, str]]) -> None:
    """Runs last: every secret made for this service is used once more, then the log of the
    whole run (gateway, health, serve and llama-server output) is searched for each."""
    for secret in store.secrets:
        status_with(svc, secret)
    assert svc.stop() == 0
    log = svc.log()
    assert keys["app"][0] in log  # requests were logged, attributed by key id
    leaked = [name for name, (_, secret) in keys.items() if secret in log]
    assert leaked == []
    assert not [s for s in store.secrets if s in log or s[-12:] in log]
