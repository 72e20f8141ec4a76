"""Requests cut short are metered (issue 22, bug 1): a client that hangs up, a llama-server
that dies, a request's timeout and the end of the shutdown grace all leave the backend's
work done and its final usage event unsent. The prompt is charged (counted by the backend
where it still answers) and so is every token relayed; the access line and the request
counter say how the request ended. Real `llamagate serve`, real llama-server, auth on."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.keytool import KeyTool
from tests.support.service import Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "tell me a long story about the sea"}]
# a stream long enough to cut anywhere: the tiny model may sample its end-of-text token
LONG: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 12000,
        "ignore_eos": True}


def _service(tmp: Path, model: Path, **env: str) -> tuple[Service, KeyTool, str]:
    keys = KeyTool(tmp / "data" / "keys.json", tmp / "data" / "usage.db")
    _, secret = keys.generate("meter")
    svc = Service(tmp, {"MODEL_PATH": str(model), "MODEL_NAME": "tiny", "CTX": "16384",
                        "USAGE_FLUSH_INTERVAL": "0.2", **env})
    return svc, keys, secret


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory,
            tiny_model: Path) -> Iterator[tuple[Service, KeyTool, str]]:
    svc, keys, secret = _service(tmp_path_factory.mktemp("cut"), tiny_model)
    with svc.running():
        yield svc, keys, secret


def _usage(keys: KeyTool) -> dict[str, int]:
    rows = json.loads(keys.ok("usage", "--json"))
    return {field: sum(r[field] for r in rows)
            for field in ("requests", "prompt_tokens", "completion_tokens")}


def _usage_once(keys: KeyTool, requests_above: int) -> dict[str, int] | None:
    """The usage totals once more than ``requests_above`` requests are written."""
    usage = _usage(keys)
    return usage if usage["requests"] > requests_above else None


def _access_line(svc: Service, request_id: str) -> dict[str, Any] | None:
    for line in svc.log().splitlines():
        if request_id in line and '"msg": "request"' in line.replace('":"', '": "'):
            entry = json.loads(line)
            if entry.get("msg") == "request":
                return dict(entry)
    return None


def _read_events(lines: Iterator[bytes], count: int) -> int:
    """Read ``count`` content events of a chat stream's lines; returns how many were read."""
    seen = 0
    for line in lines:
        if line.startswith(b"data: ") and b'"content":"' in line:
            seen += 1
            if seen == count:
                break
    return seen


def _prompt_tokens(svc: Service, secret: str) -> int:
    """What llama-server counts for MESSAGES' prompt, from an uncut request's usage."""
    r = requests.post(svc.url + CHAT, json={"model": "tiny", "messages": MESSAGES,
                                             "max_tokens": 1},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def test_a_client_that_hangs_up_pays_for_the_prompt_and_the_tokens_it_was_sent(
        metered: tuple[Service, KeyTool, str]) -> None:
    svc, keys, secret = metered
    prompt = _prompt_tokens(svc, secret)
    before = wait_for(lambda: _usage_once(keys, 0), "the first request's usage", within=10)
    rid = uuid.uuid4().hex
    with requests.post(svc.url + CHAT, json=LONG, stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid}) as r:
        assert r.status_code == 200
        read = _read_events(r.iter_lines(), 40)
    assert read == 40  # and the connection is dropped mid-stream here

    line = wait_for(lambda: _access_line(svc, rid), "the cut request's access line", within=10)
    assert line["ended"] == "client_closed" and line["status"] == 499  # as nginx logs it
    assert line["tokens_in"] == prompt  # counted by llama-server, not estimated
    assert "tokens_estimated" not in line
    # at least what the client read; never more than the stream could hold
    assert 40 <= line["tokens_out"] <= LONG["max_tokens"]

    after = wait_for(lambda: _usage_once(keys, before["requests"]),
                     "the cut request's usage", within=10)
    assert after["requests"] == before["requests"] + 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == prompt
    assert after["completion_tokens"] - before["completion_tokens"] == line["tokens_out"]

    metrics = requests.get(svc.url + "/metrics", headers={"Authorization": f"Bearer {secret}"},
                           timeout=10)
    if metrics.status_code == 200:  # an inference key may not have the metrics scope
        assert 'ended="client_closed"' in metrics.text


def test_a_request_past_its_timeout_is_charged_and_says_so(
        metered: tuple[Service, KeyTool, str]) -> None:
    svc, keys, secret = metered
    before = _usage(keys)
    rid = uuid.uuid4().hex
    # 12,000 tokens take the 1-thread tiny model seconds (it makes about 4,000 a second)
    with requests.post(svc.url + CHAT, json=LONG, stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid,
                                "X-Request-Timeout": "1"}) as r:
        assert r.status_code == 200
        body = r.content  # read to the end: the gateway ends it with an error event
    assert b'"code": "upstream_timeout"' in body or b'"code":"upstream_timeout"' in body
    relayed = body.count(b'"delta":{"content"')
    line = wait_for(lambda: _access_line(svc, rid), "the access line", within=10)
    assert line["ended"] == "timeout"
    assert line["tokens_out"] == relayed > 0
    assert line["tokens_in"] > 0
    after = wait_for(lambda: _usage_once(keys, before["requests"]),
                     "the timed-out request's usage", within=10)
    assert after["completion_tokens"] - before["completion_tokens"] == relayed


def test_a_stream_whose_llama_server_dies_is_charged(tmp_path: Path, tiny_model: Path) -> None:
    svc, keys, secret = _service(tmp_path, tiny_model)
    with svc.running():
        rid = uuid.uuid4().hex
        with requests.post(svc.url + CHAT, json=LONG, stream=True, timeout=30,
                           headers={"Authorization": f"Bearer {secret}",
                                    "X-Request-ID": rid}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert _read_events(lines, 20) == 20
            os.kill(int(svc.health()["backend"]["pid"]), signal.SIGKILL)
            rest = b"\n".join(lines)  # the gateway ends the stream with an error event
        assert b"backend_disconnected" in rest
        line = wait_for(lambda: _access_line(svc, rid), "the access line", within=10)
        assert line["ended"] == "backend_failed"
        assert line["tokens_out"] >= 20
        assert line["tokens_in"] > 0  # counted again, or estimated while llama-server restarts
        usage = wait_for(lambda: _usage_once(keys, 0), "the usage",
                         within=10)
        assert usage["completion_tokens"] == line["tokens_out"]


def test_a_stream_ended_by_the_shutdown_grace_is_charged(tmp_path: Path, tiny_model: Path) -> None:
    svc, keys, secret = _service(tmp_path, tiny_model, SHUTDOWN_GRACE_SECONDS="0.5")
    svc.start().wait_ready()
    rid = uuid.uuid4().hex
    try:
        with requests.post(svc.url + CHAT, json=LONG, stream=True,
                           timeout=30, headers={"Authorization": f"Bearer {secret}",
                                                "X-Request-ID": rid}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert _read_events(lines, 10) == 10
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
            rest = b"\n".join(lines)
        assert b"shutting_down" in rest
    finally:
        assert svc.wait_exit(60) == 0
    line = _access_line(svc, rid)
    assert line is not None and line["ended"] == "shutdown"
    assert line["tokens_out"] >= 10 and line["tokens_in"] > 0
    # written before the worker exited
    usage = _usage(keys)
    assert usage == {"requests": 1, "prompt_tokens": line["tokens_in"],
                     "completion_tokens": line["tokens_out"]}
