"""Checks a request body before it is forwarded, so bad input fails with a clear
400 from us rather than an opaque error (or wasted work) in llama-server.

Only the fields the gateway needs are looked at; the body itself is forwarded
byte for byte.

It also bounds what one request may cost before it reaches llama-server, which cannot
stop tokenizing a prompt once it has begun (issue 21: 300,000 empty messages kept it busy
for minutes after the client left): at most ``max_messages`` messages (400), a prompt of at
most ``max_prompt_bytes`` bytes of text (413), an estimated prompt of at most ``ctx`` tokens
and ``max_tokens`` at most ``ctx`` (400 ``context_length_exceeded``). The estimate is the
prompt's UTF-8 bytes / 4 (about 4 bytes a token in English text with common tokenizers;
fewer for other scripts, so it errs towards letting a prompt through) plus one per token
id; images and audio are not text and are not counted. The prompt is measured only when
the body itself is over a limit: most requests cost one len().
"""

from __future__ import annotations

import email.policy
import json
import math
import re
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any

from gateway.errors import BadRequest, GatewayError, error_for

MAX_TOKENS_CAP = 1_000_000
BYTES_PER_TOKEN = 4  # the prompt-size estimate: see the module's docstring
# parts of a prompt that are not text: their bytes are not prompt bytes
_MEDIA = frozenset({"image_url", "input_audio", "image", "file", "source", "audio"})

# path → the field that must be present (its type is checked below). /v1/messages is
# Anthropic's Messages API and /v1/responses OpenAI's Responses API, both of which
# llama-server serves; /v1/rerank is its reranking endpoint.
_REQUIRED = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/messages": "messages",
    "/v1/responses": "input",
    "/v1/rerank": "query",
    "/v1/reranking": "query",  # llama-server's alias of /v1/rerank
}
# the routes validated here: the gateway meters and limits them as inference
ROUTES: frozenset[str] = frozenset(_REQUIRED)
# the names a cap on generated tokens goes by, across those APIs and llama-server's own
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")


@dataclass(frozen=True)
class RequestInfo:
    model: str | None
    stream: bool
    max_tokens: int | None
    body: dict[str, Any] | None
    n: int = 1  # choices per prompt
    tasks: int = 1  # what llama-server runs and ends with a final event each: n per prompt


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_constant(name: str) -> None:
    # Python's json takes NaN and Infinity; llama-server's parser refuses them with a 500
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: Python reads infinity, llama-server a number overflow
        raise ValueError(f"{text} is out of range")
    return value


# built once: json.loads with a hook builds a new decoder on every call
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


# written with chr(): mypyc cannot compile a lone surrogate in a string literal
_SURROGATE = re.compile(f"[{chr(0xD800)}-{chr(0xDFFF)}]").search


def _loads(raw: bytes) -> Any:
    """json.loads, strict as llama-server's parser: no NaN, Infinity or overflowing numbers,
    no unpaired UTF-16 surrogate (llama-server answers one with a 500 and logs the text
    around it, prompt and all)."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    body = _DECODER.decode(text)
    # a pair (an emoji, as ASCII-only encoders write it) decodes to one character; only a
    # lone half is left a surrogate, and then the text cannot be UTF-8
    if "\\ud" in text or "\\uD" in text or (not text.isascii() and _SURROGATE(text)):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("it has an unpaired UTF-16 surrogate") from None
    return body


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = _loads(raw)
    except RecursionError:  # nesting deeper than the decoder's stack: no body we need
        raise BadRequest("request body is nested too deeply", code="invalid_json") from None
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


def model_of(raw: bytes, content_type: str | None) -> str | None:
    """The model a request the gateway does not validate names: a JSON object's string
    `model`, or a multipart form's `model` field (llama-server turns a form's text fields
    into its JSON body, and its router loads and runs the model named there).

    A body that looks like JSON (an object, after any byte-order mark and blanks) but
    does not parse, or a form that does not, is refused: what llama-server would read
    from it cannot be checked."""
    if content_type is not None and content_type.lower().startswith("multipart/form-data"):
        return _form_model(raw, content_type)
    if raw.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] != b"{":
        return None  # neither JSON nor a form: llama-server reads no model from it
    body = parse_json(raw)
    model = body.get("model")
    return model if isinstance(model, str) else None


def _form_model(raw: bytes, content_type: str) -> str | None:
    form = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    if not form.is_multipart() or form.defects:
        raise BadRequest("request body is not a readable multipart form", code="invalid_request")
    values = [part.get_payload(decode=True) for part in form.iter_parts()
              if part.get_param("name", header="content-disposition") == "model"
              and part.get_filename() is None]
    if len(values) > 1:  # llama-server would make them an array
        raise BadRequest("'model' is given more than once", param="model")
    if not values:
        return None
    try:
        return bytes(values[0] or b"").decode()
    except UnicodeDecodeError:
        raise BadRequest("'model' must be UTF-8 text", param="model") from None


def validate(path: str, raw: bytes, max_messages: int = 0, max_prompt_bytes: int = 0,
             ctx: int = 0) -> RequestInfo:
    """Validate an inference body for `path`; raise BadRequest naming the field. The
    limits (0: none) are the module docstring's."""
    body = parse_json(raw)
    required = _REQUIRED.get(path)
    if required is not None and required not in body:
        raise BadRequest(f"missing required field '{required}'", param=required)
    if required == "messages":
        messages = body["messages"]
        if max_messages and isinstance(messages, list) and len(messages) > max_messages:
            raise BadRequest(f"'messages' has {len(messages)} messages; the limit is "
                             f"{max_messages} (MAX_MESSAGES)", code="too_many_messages",
                             param="messages")
        _check_messages(messages)
    elif required == "query":
        if not isinstance(body["query"], str):  # the documents may come as `texts` (TEI's form)
            raise BadRequest("'query' must be a string", param="query")
    elif path == "/v1/responses":  # a string, or a list of input items (objects)
        value = body["input"]
        if not isinstance(value, str) and not (isinstance(value, list) and value):
            raise BadRequest("'input' must be a string or a non-empty array", param="input")
    elif required is not None:
        _check_text_input(required, body[required])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    stream = body.get("stream")
    if stream is None:  # OpenAI takes null for "not streamed"
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    max_tokens = None
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not (value == -1 or 1 <= value <= MAX_TOKENS_CAP):
            raise BadRequest(f"'{name}' must be an integer from 1 to {MAX_TOKENS_CAP}", param=name)
        if ctx and value > ctx:
            raise BadRequest(f"'{name}' is {value}; the context holds {ctx} tokens (CTX)",
                             code="context_length_exceeded", param=name)
        max_tokens = value if value > 0 else None
    if required is not None and ((max_prompt_bytes and len(raw) > max_prompt_bytes)
                                 or (ctx and len(raw) // BYTES_PER_TOKEN > ctx)):
        # the body bounds its prompt: only a body over a limit has its prompt measured
        _check_prompt_size(required, body[required], max_prompt_bytes, ctx)
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        raise BadRequest("'n' must be an integer from 1 to 128", param="n")
    n = n or 1
    prompt = body.get("prompt") if path == "/v1/completions" else None
    # several prompts: strings or token lists (a list of token ids is one prompt)
    prompts = len(prompt) if isinstance(prompt, list) and not _is_int(prompt[0]) else 1
    return RequestInfo(model=model, stream=stream, max_tokens=max_tokens,
                       body=body, n=n, tasks=n * prompts)


def _check_prompt_size(field: str, value: object, max_bytes: int, ctx: int) -> None:
    size, ids = _text_size(value)
    if max_bytes and size > max_bytes:
        error: GatewayError = error_for(
            413, f"'{field}' holds {size} bytes of text; the limit is {max_bytes} "
            "(MAX_PROMPT_BYTES)", code="prompt_too_large")
        error.param = field
        raise error
    tokens = -(-size // BYTES_PER_TOKEN) + ids
    if ctx and tokens > ctx:
        raise BadRequest(f"'{field}' is about {tokens} tokens (estimated at "
                         f"{BYTES_PER_TOKEN} bytes a token); the context holds {ctx} (CTX)",
                         code="context_length_exceeded", param=field)


def estimated_prompt_tokens(path: str, body: dict[str, Any] | None) -> int:
    """The prompt's size in tokens by the estimate above: what a request cut short is
    charged when the backend cannot count it (gateway/upstream/cut.py)."""
    prompt = prompt_of(path, body)
    if prompt is None:
        return 0
    size, ids = _text_size(prompt)
    return -(-size // BYTES_PER_TOKEN) + ids


def _text_size(value: object) -> tuple[int, int]:
    """(UTF-8 bytes of the text in ``value``, token ids in it), media left out. A loop, not
    recursion: the decoder takes deeper nesting than Python's stack would."""
    size = ids = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in _MEDIA)
        elif _is_int(item):
            ids += 1
    return size, ids
