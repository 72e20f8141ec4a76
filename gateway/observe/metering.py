"""Token counts read out of backend responses without decoding whole bodies.

Non-streaming bodies carry `usage` (OpenAI's, or the Responses and Anthropic Messages
APIs' input/output form). llama-server's final stream event
carries `timings` (prompt_n, cache_n, predicted_n) even when the client did not
ask for `stream_options.include_usage`, so streams are counted without changing
what the client receives. `prompt_n` counts only the prompt tokens evaluated
this time; those reused from the KV cache are `cache_n`, and `usage.prompt_tokens`
is their sum, so that is what we count too.

With `n` > 1 llama-server runs each choice in a slot of its own and ends each with a
final event of its own: a `usage` chunk per choice (chat, with include_usage), `usage`
and `timings` in each choice's finish chunk (text), or `timings` alone there (chat
without include_usage); and its own non-streamed body carries one choice's usage only.
Each choice reports the whole prompt, but the prompt is evaluated once, by one slot, whose
state and prompt counts are then copied to the others (server_slot::copy_state_to;
llamacpp:prompt_tokens_total rises once): so the completions are summed, the prompt is
counted once.

llama-server's native routes (/completion, /infill) end each task with an event, or a
result, of `"stop": true` carrying `timings` (and `tokens_evaluated` / `tokens_predicted`,
the same counts); several tasks answered whole are a JSON array of such results.
"""

from __future__ import annotations

import json
from typing import Any, Final

from gateway.upstream.events import EventParser

_decoder = json.JSONDecoder()
# the OpenAI stream chunks whose final events carry one choice's counts each
_CHUNKS = frozenset({"chat.completion.chunk", "text_completion"})


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
    return None if timings is None else _from_timings(timings)


def _from_timings(timings: dict[str, Any]) -> tuple[int, int] | None:
    prompt, completion = timings.get("prompt_n"), timings.get("predicted_n")
    cached = timings.get("cache_n", 0)
    if isinstance(prompt, int) and isinstance(completion, int) and isinstance(cached, int):
        return prompt + cached, completion
    return None


def combined(counts: list[tuple[int, int]], n: int) -> tuple[int, int]:
    """The counts of a request's tasks (``n`` choices of each of its prompts) as one: each
    prompt once (see above), every completion token."""
    return (round(sum(prompt for prompt, _ in counts) / n),
            sum(completion for _, completion in counts))


def merged_usage(usages: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The OpenAI `usage` objects of a request's tasks as one (`combined`)."""
    counts = [_from_usage(usage) for usage in usages]
    if len(usages) < 2 or None in counts:
        return usages[-1]
    prompt, completion = combined([c for c in counts if c is not None], n)
    return {**usages[-1], "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finals(events: list[bytes]) -> list[tuple[int, int]]:
    """The counts of each choice's final event among SSE events' data."""
    counts = []
    for data in events:
        if b'"usage"' in data or b'"timings"' in data:
            try:
                event = json.loads(data)
            except ValueError:
                continue
            counted = _final_counts(event) if isinstance(event, dict) else None
            if counted is not None:
                counts.append(counted)
    return counts


def _final_counts(event: dict[str, Any]) -> tuple[int, int] | None:
    kind = event.get("object")
    if kind is None and event.get("stop") is True:  # a native task's final event
        timings = event.get("timings")
        return _from_timings(timings) if isinstance(timings, dict) else None
    if kind not in _CHUNKS:
        return None
    usage = event.get("usage")
    if isinstance(usage, dict):
        return _from_usage(usage)
    # with timings_per_token every chunk has `timings`, running totals: only a choice's
    # finish chunk has its final ones (a chat one with include_usage has none: its
    # usage chunk, counted above, has them)
    timings = event.get("timings")
    if isinstance(timings, dict) and any(
            isinstance(choice, dict) and choice.get("finish_reason") is not None
            for choice in event.get("choices") or ()):
        return _from_timings(timings)
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


def anthropic_input_tokens(head: bytes) -> int | None:
    """The prompt tokens of an Anthropic Messages stream, from its first event
    (message_start's usage: those read now and those taken from the cache)."""
    if b'"input_tokens"' not in head:
        return None
    usage = _object_after(head.decode("utf-8", "replace"), "usage", last=False)
    counted = None if usage is None else _from_usage({**usage, "output_tokens": 0})
    return None if counted is None else counted[0]


def tokens_from_results(body: bytes, n: int) -> tuple[int, int] | None:
    """The counts of a native answer to several tasks (``n`` choices of each prompt): a
    JSON array of results, each with its `timings`, combined."""
    try:
        results = json.loads(body)
    except ValueError:
        return None
    counts = []
    for result in results if isinstance(results, list) else ():
        timings = result.get("timings") if isinstance(result, dict) else None
        counted = _from_timings(timings) if isinstance(timings, dict) else None
        if counted is not None:
            counts.append(counted)
    return combined(counts, n) if counts else None


def tokens_from_body(body: bytes) -> tuple[int, int] | None:
    if b'"usage"' not in body and b'"timings"' not in body:
        return None
    return tokens_from_text(body.decode("utf-8", "replace"))


class ChoiceTally:
    """Every task's final counts of an OpenAI stream with several (`n` > 1, or several
    prompts), fed each chunk as it is relayed: the last few chunks that `tokens_from_stream`
    reads lose the final events of the tasks that finished earlier. Not for one task, whose
    tail has its one final event."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._events = EventParser()
        self.counts: list[tuple[int, int]] = []

    def feed(self, chunk: bytes) -> None:
        self.counts += _finals(self._events.feed(chunk))

    def end(self) -> None:
        """The stream ended: its last event counts, though no blank line closed it."""
        self.counts += _finals(self._events.end())

    def result(self) -> tuple[int, int] | None:
        return combined(self.counts, self.n) if self.counts else None


# why a generation ended, as each API spells it → the OpenAI name: a bounded label
_FINISH_FIELDS: Final = (b'"finish_reason"', b'"stop_reason"', b'"stop_type"')
_FINISH_NAMES: Final = {
    "stop": "stop", "length": "length", "tool_calls": "tool_calls",
    "content_filter": "content_filter", "function_call": "tool_calls",
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "eos": "stop", "word": "stop", "limit": "length",  # llama-server's native stop_type
}


def finish_reason(data: bytes) -> str | None:
    """The last finish reason in an answer's body or a stream's tail (OpenAI's finish_reason,
    Anthropic's stop_reason, llama-server's native stop_type), as OpenAI names it; "other"
    for a value not known here; None when there is none."""
    for field in _FINISH_FIELDS:
        at = data.rfind(field)
        if at < 0:
            continue
        start = at + len(field)
        while start < len(data) and data[start] in b' \t:':  # `":"` or `": "`
            start += 1
        if data[start:start + 1] != b'"':
            return None  # null: not ended (a stream cut short)
        end = data.find(b'"', start + 1)
        if end > start + 1:
            return _FINISH_NAMES.get(data[start + 1:end].decode("ascii", "replace"), "other")
    return None
