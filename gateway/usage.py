"""Token counts read out of backend responses without decoding whole bodies.

Non-streaming bodies carry `usage` (OpenAI's, or the Responses and Anthropic Messages
APIs' input/output form). llama-server's final stream event
carries `timings` (prompt_n, cache_n, predicted_n) even when the client did not
ask for `stream_options.include_usage`, so streams are counted without changing
what the client receives. `prompt_n` counts only the prompt tokens evaluated
this time; those reused from the KV cache are `cache_n`, and `usage.prompt_tokens`
is their sum, so that is what we count too.
"""

from __future__ import annotations

import json
from typing import Any

_decoder = json.JSONDecoder()


def _object_after(data: str, key: str, last: bool = True) -> dict[str, Any] | None:
    at = data.rfind(f'"{key}"') if last else data.find(f'"{key}"')
    if at < 0:
        return None
    colon = data.find(":", at)
    if colon < 0:
        return None
    start = colon + 1
    while start < len(data) and data[start] in " \t\r\n":
        start += 1
    try:
        value, _ = _decoder.raw_decode(data, start)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tokens_from_text(data: str) -> tuple[int, int] | None:
    """(prompt, completion) from the last `usage` or `timings` object in `data`."""
    usage = _object_after(data, "usage")
    if usage is not None:
        counted = _from_usage(usage)
        if counted is not None:
            return counted
    timings = _object_after(data, "timings")
    if timings is not None:
        prompt, completion = timings.get("prompt_n"), timings.get("predicted_n")
        cached = timings.get("cache_n", 0)
        if isinstance(prompt, int) and isinstance(completion, int) and isinstance(cached, int):
            return prompt + cached, completion
    return None


def _from_usage(usage: dict[str, Any]) -> tuple[int, int] | None:
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    # the Responses and Anthropic Messages APIs; Anthropic's input_tokens leaves out the
    # tokens read from the cache, OpenAI's includes them
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    cached = usage.get("cache_read_input_tokens", 0)
    if isinstance(prompt, int) and isinstance(completion, int) and isinstance(cached, int):
        return prompt + cached, completion
    return None


def tokens_from_stream(head: bytes, tail: bytes) -> tuple[int, int] | None:
    """Counts of a streamed answer from its first and last chunks. An Anthropic Messages
    stream gives its input tokens in the first event (message_start) and its output
    tokens in a late one (message_delta, with only `output_tokens`)."""
    counted = tokens_from_body(tail)
    if counted is not None or b'"output_tokens"' not in tail:
        return counted
    last = _object_after(tail.decode("utf-8", "replace"), "usage")
    first = _object_after(head.decode("utf-8", "replace"), "usage", last=False)
    if last is None or first is None:
        return None
    return _from_usage({**first, "output_tokens": last.get("output_tokens")})


def tokens_from_body(body: bytes) -> tuple[int, int] | None:
    if b'"usage"' not in body and b'"timings"' not in body:
        return None
    return tokens_from_text(body.decode("utf-8", "replace"))
