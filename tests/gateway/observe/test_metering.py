"""Token counts read from the usage forms llama-server's APIs answer with."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.observe.metering import tokens_from_body, tokens_from_stream
from gateway.upstream.fold import ResponsesCollector


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
                    for e in events)


# an Anthropic Messages stream: input tokens first, output tokens near the end
ANTHROPIC = _sse(
    {"type": "message_start", "message": {"usage": {"cache_read_input_tokens": 11,
                                                    "input_tokens": 1, "output_tokens": 0}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
     "usage": {"output_tokens": 3}},
    {"type": "message_stop"},
)


def test_the_usage_forms_of_each_api() -> None:
    openai = b'{"usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}'
    assert tokens_from_body(openai) == (12, 4)
    # Responses: input_tokens already includes the cached ones
    responses = (b'{"usage": {"input_tokens": 12, "output_tokens": 4, "total_tokens": 16, '
                 b'"input_tokens_details": {"cached_tokens": 11}}}')
    assert tokens_from_body(responses) == (12, 4)
    # Anthropic: cache reads are counted apart from input_tokens
    anthropic = b'{"usage": {"cache_read_input_tokens": 11, "input_tokens": 1, "output_tokens": 4}}'
    assert tokens_from_body(anthropic) == (12, 4)
    assert tokens_from_body(b'{"usage": {"total_tokens": 3}}') is None


def test_an_anthropic_stream_is_counted_from_its_first_and_last_events() -> None:
    assert tokens_from_stream(ANTHROPIC, ANTHROPIC) == (12, 3)  # all of it in one read
    cut = ANTHROPIC.index(b"event: content_block_delta")
    assert tokens_from_stream(ANTHROPIC[:cut], ANTHROPIC[cut:]) == (12, 3)
    # an OpenAI stream's last event has it all; the first is not needed
    final = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\n'
    assert tokens_from_stream(b"", final + b"data: [DONE]\n\n") == (5, 2)


def test_a_responses_stream_without_its_final_event_is_unreadable() -> None:
    collector = ResponsesCollector()
    collector.feed(b'data: {"type": "response.output_text.delta", "delta": "hi"}\n\n')
    with pytest.raises(ValueError):  # the proxy answers 503, not a partial body
        collector.result()
    collector.feed(b'data: {"type": "response.completed", "response": {"id": "r", '
                   b'"usage": {"input_tokens": 3, "output_tokens": 1}}}\n\n')
    assert tokens_from_body(collector.result()) == (3, 1)


def test_finish_reasons_come_out_in_openais_names() -> None:
    from gateway.observe.metering import finish_reason
    assert finish_reason(b'{"choices":[{"finish_reason":"stop","index":0}]}') == "stop"
    assert finish_reason(b'data: {"finish_reason": "length"}\n\ndata: [DONE]\n\n') == "length"
    assert finish_reason(b'{"delta":{"stop_reason":"tool_use"},"usage":{}}') == "tool_calls"
    assert finish_reason(b'{"stop":true,"stop_type":"eos"}') == "stop"
    assert finish_reason(b'{"finish_reason":"something_new"}') == "other"  # a bounded label
    assert finish_reason(b'{"choices":[{"finish_reason":null}]}') is None  # cut short
    assert finish_reason(b'{"usage":{"prompt_tokens":3}}') is None
