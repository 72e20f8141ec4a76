"""SSE relay: every backend event reaches the client as it arrives."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from openai.types.chat import ChatCompletionMessageParam

from gateway.upstream.sse import split
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, next_event, sse_data
from tests.support.metrics import scrape
from tests.support.wait import wait_until

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def test_each_event_reaches_the_client_before_the_backend_sends_the_next(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    # The fake sends event i+1 only once the test has seen event i: a gateway that
    # buffered (waiting for more bytes, or for the end) would leave the client waiting.
    fake.switches.step = True
    fake.switches.events = 4
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Request-ID"]
        for i in range(4):
            event = json.loads(await next_event(r.content, within=5))
            assert event["choices"][0]["delta"]["content"] == f"t{i}"
            assert fake.sent_events == i + 1  # the backend has not sent the next one yet
            fake.proceed.set()
        final = json.loads(await next_event(r.content))
        assert final["choices"][0]["finish_reason"] == "length" and "timings" in final
        assert await next_event(r.content) == "[DONE]"


async def test_slow_stream_is_relayed_in_full(gateway: Gateway, fake: FakeLlama,
                                              http: aiohttp.ClientSession) -> None:
    fake.switches.events = 5
    fake.switches.chunk_delay = 0.02
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True}) as r:
        events = sse_data(await r.text())
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]] == \
        ["t0", "t1", "t2", "t3", "t4", None]
    assert events[-1] == "[DONE]"


async def test_sdk_reads_a_relayed_stream(gateway: Gateway, fake: FakeLlama) -> None:
    async with gateway.sdk() as client:
        stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "t0t1t2"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_tokens_are_counted_from_a_final_event_split_over_reads(
        gateway: Gateway, fake: FakeLlama, http: aiohttp.ClientSession) -> None:
    # the final `timings` event in six pieces, each sent once the one before it is out; the
    # gateway holds the unfinished event back, so the client gets it whole
    fake.switches.step = True
    fake.switches.events = 1
    fake.switches.final_pieces = 6
    async with http.post(gateway.url + CHAT, json={"messages": MESSAGES, "stream": True}) as r:
        for piece in range(1, 6):
            def sent(piece: int = piece) -> bool:
                return fake.final_pieces_sent >= piece
            await wait_until(sent, f"piece {piece} of the final event")
            fake.proceed.set()
        received = await asyncio.wait_for(r.read(), 5)
    assert received.endswith(b"data: [DONE]\n\n") and b'"predicted_n":1' in received
    body, samples = await scrape(http, gateway.url)
    key = {"model": "tiny", "key_id": "-"}
    assert samples.get_value("llamagate_completion_tokens_total", **key) == 1
    assert samples.get_value("llamagate_prompt_tokens_total", **key) == 7


def test_a_large_read_ending_mid_event_holds_back_only_the_unfinished_event() -> None:
    """A slow client's reads are large (up to 256 KiB buffered): what is held back is the
    unfinished event, whatever the size of the read before it."""
    whole = b'data: {"n": 1}\n\n' * 10_000  # 150 KB, past the 64 KiB bound on what is held
    assert split(whole + b'data: {"ha') == (whole, b'data: {"ha')
    assert split(b"x" * 70_000) == (b"x" * 70_000, b"")  # no event end in sight: passed on
    assert split(b'data: 1\r\n\r\ndata: 2') == (b"data: 1\r\n\r\n", b"data: 2")

