"""Checks a request body before it is forwarded, so bad input fails with a clear
400 from us rather than an opaque error (or wasted work) in llama-server.

Only the fields the gateway needs are looked at; the body itself is forwarded
byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest

MAX_TOKENS_CAP = 1_000_000

# path → (field that must be present, what it must be)
_REQUIRED = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
}


@dataclass(frozen=True)
class RequestInfo:
    model: str | None
    stream: bool
    max_tokens: int | None
    include_usage: bool
    body: dict[str, Any] | None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'",
                             param=f"messages[{i}]")
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"'messages[{i}].content' must be a string or an array",
                             param=f"messages[{i}].content")


def _check_text_input(name: str, value: object) -> None:
    ok = isinstance(value, str) or (
        isinstance(value, list) and bool(value)
        and all(isinstance(v, (str, int, list)) for v in value))
    if not ok:
        raise BadRequest(f"'{name}' must be a string or a non-empty array", param=name)


def prompt_of(path: str, body: dict[str, Any] | None) -> object:
    """The user's text in `body` (messages, prompt or input), for LOG_PROMPTS."""
    field = _REQUIRED.get(path)
    return None if field is None or body is None else body.get(field)


def validate(path: str, raw: bytes) -> RequestInfo:
    """Validate an inference body for `path`; raise BadRequest naming the field."""
    body = parse_json(raw)
    required = _REQUIRED.get(path)
    if required is not None and required not in body:
        raise BadRequest(f"missing required field '{required}'", param=required)
    if required == "messages":
        _check_messages(body["messages"])
    elif required is not None:
        _check_text_input(required, body[required])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not (value == -1 or 1 <= value <= MAX_TOKENS_CAP):
            raise BadRequest(f"'{name}' must be an integer from 1 to {MAX_TOKENS_CAP}", param=name)
        max_tokens = value if value > 0 else None
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        raise BadRequest("'n' must be an integer from 1 to 128", param="n")
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    return RequestInfo(model=model, stream=stream, max_tokens=max_tokens,
                       include_usage=include_usage, body=body)
