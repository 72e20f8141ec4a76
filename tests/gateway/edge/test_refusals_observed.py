"""Requests the edge server's parser refuses (400, 414, 431) are answered like every
other request, by the gateway's handler: OpenAI-shaped, with an X-Request-ID, one
access line and one `llamagate_requests_total` sample, and the connection closed."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import aiohttp
import pytest

from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, assert_openai_error
from tests.support.metrics import scrape
from tests.support.rawhttp import Answer, Client, request

GENERATED = re.compile(r"[0-9a-f]{32}").fullmatch
APP = "https://app.example"

REFUSALS = [  # what is sent; status, code, part of the message, the route it is counted under
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid_request", "malformed HTTP request", "other"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
     400, "invalid_request", "Host header", "/v1/chat/completions"),
    (request("POST", "/v1/chat/completions", b"lost", {"Connection": "Upgrade", "Upgrade": "h2c"}),
     400, "invalid_request", "upgrades are not supported", "/v1/chat/completions"),
    (request("GET", "/v1/models?" + "q" * 9000), 414, "uri_too_long", "too long", "other"),
    (request("GET", "/v1/models", headers={"X-Big": "v" * 9000}),
     431, "request_header_fields_too_large", "too large", "other"),
    (request("GET", "/v1/models", headers={f"X-H{i}": "v" for i in range(200)}),
     431, "request_header_fields_too_large", "too many", "other"),
]
IDS = ["malformed", "no-host", "upgrade-with-body", "long-target", "long-header", "many-headers"]


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "llamagate.access"]


async def _refused(gateway: Gateway, send: bytes) -> Answer:
    client = await Client.connect(gateway.port)
    try:
        await client.send(send)
        answer = await client.answer()
        assert not answer.keep_alive
        assert await client.closed()  # nothing after a refusal is trusted to be a request
        return answer
    finally:
        await client.close()


@pytest.mark.parametrize(("send", "status", "code", "why", "route"), REFUSALS, ids=IDS)
async def test_a_refusal_is_answered_logged_and_counted(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture,
        send: bytes, status: int, code: str, why: str, route: str) -> None:
    caplog.set_level(logging.INFO, logger="llamagate.access")
    answer = await _refused(gateway, send)
    assert answer.status == status
    assert answer.headers["content-type"] == "application/json"
    error = assert_openai_error(json.loads(answer.body), "invalid_request_error", code)
    assert why in error["message"]
    request_id = answer.headers["x-request-id"]
    assert GENERATED(request_id)
    [line] = _access_lines(caplog)
    assert (line["request_id"], line["status"], line["route"], line["error"]) == \
        (request_id, status, route, code)
    _, samples = await scrape(http, gateway.url)
    assert samples.get_value("llamagate_requests_total", ended="completed", route=route, status=str(status),
                             model="-", key_id="-") == 1
    assert fake.requests() == []


async def test_a_refusal_after_an_answer_has_its_own_id_and_line(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamagate.access")
    client = await Client.connect(gateway.port)
    try:
        # the request's id must not carry over to the garbage after it
        await client.send(request("GET", "/v1/models", headers={"X-Request-ID": "first-1"})
                          + b"\x00\x01 NOT HTTP\r\n\r\n")
        answer, refusal = await client.answers(2)
        assert await client.closed()
    finally:
        await client.close()
    assert (answer.status, answer.headers["x-request-id"]) == (200, "first-1")
    assert refusal.status == 400 and GENERATED(refusal.headers["x-request-id"])
    lines = _access_lines(caplog)
    assert [(x["request_id"], x["status"]) for x in lines] == [
        ("first-1", 200), (refusal.headers["x-request-id"], 400)]


async def test_the_clients_id_is_kept_only_from_a_head_read_whole(gateway: Gateway) -> None:
    whole = await _refused(gateway, b"GET /v1/models HTTP/1.1\r\nX-Request-ID: mine-1\r\n\r\n")
    assert (whole.status, whole.headers["x-request-id"]) == (400, "mine-1")
    broken = await _refused(gateway, request("GET", "/v1/models", headers={
        "X-Request-ID": "mine-2", "X-Big": "v" * 9000}))
    assert broken.status == 431 and GENERATED(broken.headers["x-request-id"])


async def test_a_refusal_carries_cors_headers(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(CORS_ORIGINS=APP)
    answer = await _refused(gateway, f"POST /v1/chat/completions HTTP/1.1\r\nOrigin: {APP}\r\n"
                                     "Content-Length: 0\r\n\r\n".encode())
    assert answer.status == 400
    assert answer.headers["access-control-allow-origin"] == APP
    assert "X-Request-ID" in answer.headers["access-control-expose-headers"]
