"""Prefix affinity for the upstream pool: which conversation a request continues, so that it
goes back to the llama-server that still holds that conversation's prompt in its KV cache.

A conversation is named by the client's `prompt_cache_key` (OpenAI's field for exactly
this) or `user` when sent; otherwise by its opening: the messages up to and including the
first user message (and an Anthropic request's `system`), at most PREFIX_CHARS characters of
them (about 500 tokens). Every turn of a chat repeats that opening, so each turn hashes
alike; two conversations that open alike share a cached prefix anyway. A text prompt
(/v1/completions, /completion) is named by its first PREFIX_CHARS characters.

The table remembers the upstream that last served each conversation, at most MAX_ENTRIES of
them, the least recently routed forgotten first. Hashes are Python's own (per process): the
table lives in one worker's memory.
"""

from __future__ import annotations

from typing import Any, Final

PREFIX_CHARS: Final = 2048
MAX_ENTRIES: Final = 100_000


def conversation_key(body: dict[str, Any]) -> int | None:
    """The conversation a request body continues, hashed; None when it names none."""
    named = body.get("prompt_cache_key")
    if not isinstance(named, str) or not named:
        named = body.get("user")
    if isinstance(named, str) and named:
        return hash(("key", named))
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return _opening(messages, body.get("system"))
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str) and prompt:
        return hash(("prompt", prompt[:PREFIX_CHARS]))
    if isinstance(prompt, list) and prompt:  # a Responses API input list is messages
        return _opening(prompt, None) if isinstance(prompt[0], dict) else None
    return None


def _opening(messages: list[Any], system: object) -> int | None:
    parts: list[object] = [] if system is None else [repr(system)[:PREFIX_CHARS]]
    size = 0
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        text = content if isinstance(content, str) else repr(content)
        parts.append(message.get("role"))
        parts.append(text[:PREFIX_CHARS - size])
        size += len(text)
        if size >= PREFIX_CHARS or message.get("role") == "user":
            break
    return hash(tuple(parts))


class AffinityTable:
    """Conversation → the index of the upstream that served it last."""

    __slots__ = ("_last", "_limit")

    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self._last: dict[int, int] = {}
        self._limit = limit

    def get(self, key: int) -> int:
        return self._last.get(key, -1)

    def served(self, key: int, member: int) -> None:
        last = self._last
        if last.pop(key, -1) == -1 and len(last) >= self._limit:
            del last[next(iter(last))]  # the least recently routed
        last[key] = member

    def __len__(self) -> int:
        return len(self._last)
