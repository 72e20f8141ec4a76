"""Non-streaming completions fetched from llama-server as streams, answered as one JSON body.

Why: llama-server notices that the client of a *non-streaming* request went away
only when its result queue has been silent for a whole second (HTTP_POLLING_SECONDS
in server-queue.cpp), and never while results for other requests keep arriving, so a
hung-up client's generation can run on for its full max_tokens. A streaming request
is checked at every token. So the gateway asks for a stream (with usage in the final
chunk), and when its own client disconnects it closes that stream and the slot is free
at the next token. The client still gets the body llama-server would have sent:
`Collector` folds the chunks back into a `chat.completion` / `text_completion`
(content, reasoning, tool calls, logprobs, finish reason, usage, timings).
"""

from __future__ import annotations

import json
from typing import Any

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


def stream_body(body: dict[str, Any]) -> bytes:
    """The request as a stream with usage in its final chunk."""
    return json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}},
                      separators=(",", ":")).encode()


class UpstreamError(Exception):
    """The stream carried an error event; `.body` is llama-server's error object."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error", body)))
        self.body = body


class Collector:
    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self._buffer = b""
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._extra: dict[str, Any] = {}  # usage, timings: the last value wins

    def feed(self, chunk: bytes) -> None:
        """Take bytes as they arrive; events may be split across reads."""
        self._buffer += chunk
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            self._event(event)

    def _event(self, event: bytes) -> None:
        data = b"".join(line[5:].lstrip(b" ") for line in event.split(b"\n")
                        if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return
        obj = json.loads(data)
        if not isinstance(obj, dict):
            return
        if "error" in obj and "choices" not in obj:
            raise UpstreamError(obj)
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in obj and key not in self._head:
                self._head[key] = obj[key]
        for key in ("usage", "timings"):
            if obj.get(key) is not None:
                self._extra[key] = obj[key]
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
