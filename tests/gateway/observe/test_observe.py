"""The access log: one structured JSON line per request, complete, and without the
prompt text unless LOG_PROMPTS=true."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from openai.types.chat import ChatCompletionMessageParam

from core.logs import JsonFormatter
from tests.gateway.conftest import StartGateway
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway
from tests.support.rawhttp import Client, json_request
from tests.support.wait import wait_until

CHAT = "/v1/chat/completions"
SECRET_PROMPT = "the-launch-code-is-0000"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": SECRET_PROMPT}]


class AccessLines:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in self.text.splitlines()]
        return [e for e in entries if e["logger"] == "llamagate.access"]


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[AccessLines]:
    """Every gateway log record, formatted as production formats it (at emit time,
    inside the request's logging context)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("llamagate")
    caplog.set_level(logging.INFO, logger="llamagate")
    logger.addHandler(handler)
    try:
        yield AccessLines(stream)
    finally:
        logger.removeHandler(handler)
        handler.close()


async def test_one_complete_line_per_request(gateway: Gateway, fake: FakeLlama,
                                             http: aiohttp.ClientSession,
                                             access_log: AccessLines) -> None:
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "max_tokens": 5},
                         headers={"X-Request-ID": "req-plain"}) as r:
        assert r.status == 200
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True},
                         headers={"X-Request-ID": "req-stream"}) as r:
        await r.read()
    async with http.post(gateway.url + CHAT, data=b"{", headers={"X-Request-ID": "req-bad"}) as r:
        assert r.status == 400
    async with http.get(gateway.url + "/health") as r:  # probes are not logged
        assert r.status == 200

    lines = {line["request_id"]: line for line in access_log.lines()}
    assert set(lines) == {"req-plain", "req-stream", "req-bad"}
    plain = lines["req-plain"]
    assert plain["msg"] == "request" and plain["role"] == "gateway"
    assert (plain["route"], plain["status"], plain["model"], plain["key_id"]) == \
        (CHAT, 200, "tiny", "-")
    assert (plain["tokens_in"], plain["tokens_out"]) == (7, 5)  # the usage the client saw
    # a short non-streaming answer comes whole from llama-server: no time to first token
    assert plain["ttft_ms"] is None and plain["duration_ms"] >= 0 and plain["queue_ms"] >= 0
    stream = lines["req-stream"]
    assert stream["stream"] is True and stream["status"] == 200
    # counted from the final `timings` event: 3 evaluated + 4 cached prompt tokens
    assert (stream["tokens_in"], stream["tokens_out"]) == (7, 3)
    assert stream["ttft_ms"] is not None and stream["ttft_ms"] <= stream["duration_ms"]
    bad = lines["req-bad"]
    assert bad["status"] == 400 and bad["tokens_in"] is None and bad["queue_ms"] is None
    assert bad["error"] == "invalid_json" and plain["error"] is None
    assert SECRET_PROMPT not in access_log.text
    assert "prompt" not in plain


async def test_prompts_are_logged_only_with_log_prompts(start_gateway: StartGateway,
                                                        http: aiohttp.ClientSession,
                                                        access_log: AccessLines) -> None:
    gateway = await start_gateway(LOG_PROMPTS="true")
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "max_tokens": 2}) as r:
        assert r.status == 200
    async with http.post(gateway.url + "/v1/completions",
                         json={"prompt": "complete me", "max_tokens": 2}) as r:
        assert r.status == 200
    first, second = access_log.lines()
    assert first["prompt"] == MESSAGES
    assert second["prompt"] == "complete me"


async def test_a_client_that_leaves_is_logged_as_499(gateway: Gateway, fake: FakeLlama,
                                                     access_log: AccessLines) -> None:
    fake.switches.hang_before_headers = True
    client = await Client.sending(gateway.url, json_request(
        CHAT, {"messages": MESSAGES}, headers={"X-Request-ID": "req-gone"}))
    await fake.wait_for_requests(1, CHAT)
    await client.drop()
    await wait_until(access_log.lines, "the access line", within=2)
    [line] = access_log.lines()
    assert (line["request_id"], line["status"], line["error"]) == ("req-gone", 499,
                                                                  "client_disconnected")
