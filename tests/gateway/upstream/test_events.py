"""The one SSE event parser (gateway/upstream/events.py): LF, CRLF and CR framing as the
SSE spec has them, events split anywhere across reads; and the answers built from such
streams."""

from __future__ import annotations

import json

import aiohttp
import pytest

from gateway.observe.metering import ChoiceTally
from gateway.upstream.events import EventParser, boundary
from gateway.upstream.fold import Collector
from gateway.upstream.sse import split
from tests.gateway.upstream.scripted import Scripted, answer
from tests.support.gateway import Gateway

ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


def _chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0,
                       "model": "tiny", "choices": [{"index": 0, "delta": delta,
                                                     "finish_reason": finish}], **extra},
                      separators=(",", ":")).encode()


USAGE = json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                    "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                             "total_tokens": 5}}).encode()
EVENTS = [_chunk({"role": "assistant", "content": "Hel"}), _chunk({"content": "lo"}),
          _chunk({}, "stop"), USAGE, b"[DONE]"]


def stream(end: bytes) -> bytes:
    return b"".join(b"data: " + data + end + end for data in EVENTS)


def parse(chunks: list[bytes]) -> list[bytes]:
    parser = EventParser()
    return [data for chunk in chunks for data in parser.feed(chunk)]


@pytest.mark.parametrize("end", ENDINGS.values(), ids=ENDINGS.keys())
def test_each_framing_gives_the_same_events_however_the_reads_split_it(end: bytes) -> None:
    data = stream(end)
    assert parse([data]) == EVENTS
    for at in range(1, len(data)):  # a CRLF split between reads is one line end still
        assert parse([data[:at], data[at:]]) == EVENTS, at
    assert parse([data[i:i + 1] for i in range(len(data))]) == EVENTS


def test_fields_as_the_spec_reads_them() -> None:
    data = (b": a comment\n"
            b"event: message\nid: 7\nretry: 10\n"
            b"data:  two spaces\r\ndata:none\rdata\n\n"  # one leading space goes; "data" alone: empty
            b"data: x\n\r\n"  # LF then CRLF: a blank line
            b"data: only-at-end")
    parser = EventParser()
    assert parser.feed(data) == [b" two spaces\nnone\n", b"x"]
    assert parser.end() == [b"only-at-end"]  # a last event cut short of its blank line
    assert parse([b": just a comment\n\n", b"event: ping\n\n"]) == []


@pytest.mark.parametrize("end", ENDINGS.values(), ids=ENDINGS.keys())
def test_the_relay_holds_back_only_an_unfinished_event(end: bytes) -> None:
    whole = b"data: a" + end + end + b"data: b" + end + end
    assert boundary(whole) == len(whole)
    assert split(whole + b"data: c" + end) == (whole, b"data: c" + end)
    assert split(b"data: c") == (b"", b"data: c")


@pytest.mark.parametrize("end", ENDINGS.values(), ids=ENDINGS.keys())
def test_a_folded_body_from_each_framing(end: bytes) -> None:
    collector = Collector(chat=True)
    data = stream(end)
    for at in range(0, len(data), 7):
        collector.feed(data[at:at + 7])
    body = json.loads(collector.result())
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["usage"]["total_tokens"] == 5


@pytest.mark.parametrize("end", ENDINGS.values(), ids=ENDINGS.keys())
def test_the_choice_tally_reads_each_framing(end: bytes) -> None:
    tally = ChoiceTally(1)
    data = stream(end)
    for at in range(0, len(data), 5):
        tally.feed(data[at:at + 5])
    assert tally.result() == (3, 2)


@pytest.mark.parametrize("end", ENDINGS.values(), ids=ENDINGS.keys())
async def test_a_non_streaming_answer_folded_from_a_stream_of_each_framing(
        scripted: Scripted, scripted_gateway: Gateway, http: aiohttp.ClientSession,
        end: bytes) -> None:
    scripted.answers[("POST", "/v1/chat/completions")] = answer(
        "200 OK", stream(end), "Content-Type: text/event-stream")
    async with http.post(scripted_gateway.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200
        body = await r.json()
    [(_, _, sent)] = scripted.seen
    assert json.loads(sent)["stream"] is True  # it was fetched as a stream
    assert body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello"}}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
