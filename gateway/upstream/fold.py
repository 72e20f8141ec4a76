"""Non-streaming completions fetched from llama-server as streams, answered as one JSON body.

Why: llama-server notices that the client of a *non-streaming* request went away
only when its result queue has been silent for a whole second (HTTP_POLLING_SECONDS
in server-queue.cpp), and never while results for other requests keep arriving, so a
hung-up client's generation can run on for its full max_tokens. A streaming request
is checked at every token. So the gateway asks for a stream (with usage in the final
chunk), and when its own client disconnects it closes that stream and the slot is free
at the next token. The client still gets the body llama-server would have sent:
`Collector` folds the chunks back into a `chat.completion` / `text_completion`
(content, reasoning, tool calls, logprobs, finish reason, usage, timings). With `n` > 1
or several prompts its `usage` counts every choice (gateway/observe/metering.py), as OpenAI's does,
where llama-server's own body counts one; such requests are always fetched this way.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.observe.metering import merged_usage
from gateway.upstream.events import EventParser

# the OpenAI routes, then llama-server's OpenAI Responses one, whose final event carries the
# whole response. Not its Anthropic Messages one: that stream sometimes lacks its first
# event (message_start: id, model, input tokens) when the first token is a partial UTF-8
# character, so a body rebuilt from it would be incomplete.
_OPENAI = frozenset({"/v1/chat/completions", "/v1/completions"})
ROUTES = _OPENAI | {"/v1/responses"}


def stream_body(body: dict[str, Any], path: str = "/v1/chat/completions") -> bytes:
    """The request as a stream (with usage in its final chunk)."""
    streamed = {**body, "stream": True}
    if path in _OPENAI:
        streamed["stream_options"] = {"include_usage": True}
    return json.dumps(streamed, separators=(",", ":")).encode()


def collector_for(path: str, n: int = 1) -> Collector | ResponsesCollector:
    """``n``: the request's choices per prompt."""
    if path == "/v1/responses":
        return ResponsesCollector()
    return Collector(chat=path == "/v1/chat/completions", n=n)


class UpstreamError(Exception):
    """The stream carried an error event; `.body` is llama-server's error object."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error", body)))
        self.body = body


class _Events:
    """Whole SSE events out of reads that may split them; each one's `data` as JSON."""

    def __init__(self) -> None:
        self._parser = EventParser()

    def feed(self, chunk: bytes) -> None:
        """Take bytes as they arrive; events may be split across reads."""
        for data in self._parser.feed(chunk):
            if data != b"[DONE]":
                obj = json.loads(data)
                if isinstance(obj, dict):
                    self.event(obj)

    def event(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError


class Collector(_Events):
    """A chat or text completion stream folded back into the body it describes."""

    def __init__(self, chat: bool, n: int = 1) -> None:
        super().__init__()
        self.chat = chat
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.n = n
        # usage, timings: the last value wins, but for usage with several tasks, which counts
        # each one's (a final event each); timings stay one's, as llama-server has them
        self._extra: dict[str, Any] = {}
        self._usages: list[dict[str, Any]] = []

    def event(self, obj: dict[str, Any]) -> None:
        if "error" in obj and "choices" not in obj:
            raise UpstreamError(obj)
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in obj and key not in self._head:
                self._head[key] = obj[key]
        for key in ("usage", "timings"):
            if obj.get(key) is not None:
                self._extra[key] = obj[key]
        if isinstance(obj.get("usage"), dict):
            self._usages.append(obj["usage"])
        for choice in obj.get("choices") or ():
            self._choice(choice)

    def _choice(self, part: dict[str, Any]) -> None:
        index = int(part.get("index", 0))
        acc = self._choices.setdefault(index, {"index": index, "finish_reason": None})
        if part.get("finish_reason") is not None:
            acc["finish_reason"] = part["finish_reason"]
        logprobs = part.get("logprobs")
        if logprobs:
            _merge_logprobs(acc, logprobs)
        if not self.chat:
            acc["text"] = acc.get("text", "") + (part.get("text") or "")
            return
        delta = part.get("delta") or {}
        message = acc.setdefault("message", {"role": "assistant", "content": None})
        if delta.get("role"):
            message["role"] = delta["role"]
        for key in ("content", "reasoning_content"):
            if delta.get(key) is not None:
                message[key] = (message.get(key) or "") + delta[key]
        for call in delta.get("tool_calls") or ():
            _merge_tool_call(message, call)

    def result(self) -> bytes:
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            if not self.chat:
                choice.setdefault("text", "")
                choice.setdefault("logprobs", None)
            choices.append(choice)
        if len(self._usages) > 1:
            self._extra["usage"] = merged_usage(self._usages, self.n)
        body = {"choices": choices, **self._head,
                "object": "chat.completion" if self.chat else "text_completion", **self._extra}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _merge_tool_call(message: dict[str, Any], part: dict[str, Any]) -> None:
    calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
    index = int(part.get("index", len(calls)))
    while len(calls) <= index:
        calls.append({"type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    for key in ("id", "type"):
        if part.get(key):
            call[key] = part[key]
    function = part.get("function") or {}
    for key in ("name", "arguments"):
        if function.get(key):
            call["function"][key] += function[key]


def _merge_logprobs(acc: dict[str, Any], part: dict[str, Any]) -> None:
    """Chat: `{"content": [...]}` lists are joined; text: each parallel list is joined."""
    merged: dict[str, Any] = acc.setdefault("logprobs", {})
    for key, value in part.items():
        if isinstance(value, list):
            merged[key] = merged.get(key, []) + value
        else:
            merged.setdefault(key, value)


class ResponsesCollector(_Events):
    """An OpenAI Responses stream: its final event carries the whole response."""

    def __init__(self) -> None:
        super().__init__()
        self._response: object = None  # a dict unless the backend sent something else

    def event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind in ("error", "response.failed"):
            raise UpstreamError(obj)
        if kind in ("response.completed", "response.incomplete"):
            self._response = obj.get("response")

    def result(self) -> bytes:
        if not isinstance(self._response, dict):
            raise ValueError("the stream ended without its response")
        # what llama-server's non-streamed response has and its final event lacks
        response = dict(self._response)
        if response.get("status") == "completed":
            response.setdefault("completed_at", int(time.time()))
        for item in response.get("output") or ():
            if isinstance(item, dict) and item.get("type") == "reasoning":
                item.setdefault("status", "completed")
        return json.dumps(response, ensure_ascii=False, separators=(",", ":")).encode()
