"""Checks a request body before it is forwarded: only what llama-server itself refuses
(with the same status: a 400 from us is one round trip and no slot sooner) and what the
gateway must read to do its job (issue 26: a drop-in must not refuse what llama-server
serves). Each route's table entry (``_ROUTES``) names the fields it reads:

- the body must be a JSON object (400 ``invalid_json``; llama-server answers a body it
  cannot parse with a 500, which the SDKs retry in vain: the one status we choose apart);
- the field llama-server requires on the route (``required``: one of them present), and
  for chat and /apply-template ``messages`` an array; a rerank ``query`` a string;
- ``stream`` a boolean or null, the route's caps on generated tokens (``tokens``) a number
  from -1 to 2**31-1, and ``n`` a number of at least 1, where llama-server checks them;
  ``model`` is read when it is a string (anything else names no model, as llama-server's
  single-model server reads it).

Everything else (the messages' shape, a prompt's type) is llama-server's to judge: the
body is forwarded byte for byte.

It also bounds what one request may cost before it reaches llama-server, which cannot
stop tokenizing a prompt once it has begun (issue 21: 300,000 empty messages kept it busy
for minutes after the client left): at most ``max_messages`` messages (400), a prompt of at
most ``max_prompt_bytes`` bytes of text (413), and on the routes that run a model an
estimated prompt of at most ``ctx`` tokens and a token cap of at most ``ctx`` (400
``context_length_exceeded``). The estimate is the prompt's UTF-8 bytes / 4 (about 4 bytes a
token in English text with common tokenizers; fewer for other scripts, so it errs towards
letting a prompt through) plus one per token id; images and audio are not text and are not
counted. The prompt is measured only when the body itself is over a limit: most requests
cost one len().
"""

from __future__ import annotations

import email.policy
import json
import math
import re
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any, Final

from gateway.errors import BadRequest, GatewayError, error_for

MAX_TOKENS_CAP: Final = 2**31 - 1  # llama-server's own bound on every token cap
BYTES_PER_TOKEN = 4  # the prompt-size estimate: see the module's docstring
# parts of a prompt that are not text: their bytes are not prompt bytes
_MEDIA = frozenset({"image_url", "input_audio", "image", "file", "source", "audio"})


@dataclass(frozen=True, slots=True)
class _Route:
    required: tuple[str, ...] = ()  # one of these must be there (llama-server's 400)
    prompt: tuple[str, ...] = ()  # the prompt's fields: bounded, estimated, logged
    tokens: tuple[str, ...] = ()  # caps on generated tokens llama-server checks (400)
    lenient: tuple[str, ...] = ()  # caps it reads if they are numbers, and ignores if not
    streams: bool = False  # reads `stream`
    choices: bool = False  # reads `n`
    inference: bool = True  # runs a model on a slot; else answered in llama-server's HTTP thread


_CHAT: Final = _Route(("messages",), ("messages",),
               ("max_tokens", "max_completion_tokens", "n_predict"), streams=True, choices=True)
_TEXT: Final = _Route(("prompt",), ("prompt",), ("max_tokens", "n_predict"), streams=True,
                     choices=True)
_EMBED: Final = _Route(("input", "content"), ("input", "content"))
_RERANK: Final = _Route(("query",), ("query", "documents", "texts"))
_NATIVE_TEXT: Final = _Route(("prompt",), ("prompt",), ("n_predict",), ("max_tokens",),
                      streams=True, choices=True)
# /v1/messages is Anthropic's Messages API and /v1/responses OpenAI's Responses API, both
# of which llama-server serves; the paths without /v1 are llama-server's native API
_ROUTES: Final[dict[str, _Route]] = {
    "/v1/chat/completions": _CHAT,
    "/v1/completions": _TEXT,
    "/v1/embeddings": _EMBED,
    # without `messages` llama-server answers 500: it is left to answer so
    "/v1/messages": _Route((), ("messages",), ("max_tokens",), streams=True),
    "/v1/responses": _Route(("input",), ("input",), ("max_output_tokens", "max_tokens"),
                            streams=True, choices=True),
    "/v1/rerank": _RERANK,
    "/v1/reranking": _RERANK,  # llama-server's alias of /v1/rerank
    "/completion": _NATIVE_TEXT,
    "/completions": _NATIVE_TEXT,  # llama-server's: the native route, not the OpenAI one
    "/infill": _Route((), ("input_prefix", "input_suffix", "prompt", "input_extra"),
                      ("n_predict",), ("max_tokens",), streams=True, choices=True),
    "/embedding": _EMBED,
    "/embeddings": _EMBED,  # native, as /embedding
    "/rerank": _RERANK,
    "/reranking": _RERANK,
    "/tokenize": _Route((), ("content",), inference=False),
    "/detokenize": _Route(inference=False),
    "/apply-template": _Route(("messages",), ("messages",), inference=False),
}
# the /v1 routes validated here: the gateway meters and limits them as inference
ROUTES: Final = frozenset(p for p in _ROUTES if p.startswith("/v1/"))
# llama-server's native POST routes the gateway serves (gateway/upstream/llama_routes.py)
NATIVE: Final = frozenset(p for p in _ROUTES if not p.startswith("/v1/"))
# those answered without a slot and not metered: tokenizing and templating
UTILITY: Final = frozenset(p for p, r in _ROUTES.items() if not r.inference)
# fields holding a list of messages: counted against MAX_MESSAGES
_MESSAGES: Final = "messages"


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


def prompt_of(path: str, body: dict[str, Any] | None) -> object:
    """The user's text in `body` (messages, prompt, input, ...), for LOG_PROMPTS: its one
    prompt field's value, or those of several (infill, rerank) by name."""
    route = _ROUTES.get(path)
    if route is None or body is None or not route.prompt:
        return None
    if len(route.prompt) == 1:
        return body.get(route.prompt[0])
    found = {name: body[name] for name in route.prompt if name in body}
    return found or None


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
    """Validate a body for `path` (a route in ``_ROUTES``); raise BadRequest naming the
    field. The limits (0: none) are the module docstring's."""
    body = parse_json(raw)
    route = _ROUTES[path]
    required = route.required
    if required and not any(name in body for name in required):
        raise BadRequest(f"missing required field '{required[0]}'", param=required[0])
    messages = body.get(_MESSAGES) if _MESSAGES in required else None
    if messages is not None:
        if not isinstance(messages, list):  # llama-server: "Expected 'messages' to be an array"
            raise BadRequest("'messages' must be an array", param="messages")
    elif route.prompt == (_MESSAGES,) and isinstance(body.get(_MESSAGES), list):
        messages = body[_MESSAGES]
    if max_messages and messages is not None and len(messages) > max_messages:
        raise BadRequest(f"'messages' has {len(messages)} messages; the limit is "
                         f"{max_messages} (MAX_MESSAGES)", code="too_many_messages",
                         param="messages")
    if route is _RERANK and not isinstance(body["query"], str):
        raise BadRequest("'query' must be a string", param="query")
    stream = body.get("stream") if route.streams else None
    if stream is None:  # OpenAI takes null for "not streamed", and so does llama-server
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    ctx = ctx if route.inference else 0  # tokenizing is not bounded by the context
    max_tokens = _max_tokens(body, route, ctx)
    if route.prompt and ((max_prompt_bytes and len(raw) > max_prompt_bytes)
                         or (ctx and len(raw) // BYTES_PER_TOKEN > ctx)):
        # the body bounds its prompt: only a body over a limit has its prompt measured
        _check_prompt_size(route.prompt, body, max_prompt_bytes, ctx)
    n = _number(body, "n") if route.choices else None
    if n is not None and n < 1:
        raise BadRequest("'n' must be at least 1", param="n")
    n = n or 1
    prompts = _prompts(body.get("prompt")) if "prompt" in required else 1
    model = body.get("model")
    return RequestInfo(model=model if isinstance(model, str) else None, stream=stream,
                       max_tokens=max_tokens, body=body, n=n, tasks=n * prompts)


def _number(body: dict[str, Any], name: str) -> int | None:
    """A field llama-server reads as an integer: any JSON number (a fraction truncated, a
    boolean as 0 or 1, as it reads them) or null; anything else is its 400 too."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)):
        raise BadRequest(f"'{name}' must be a number", param=name)
    return int(value)


def _max_tokens(body: dict[str, Any], route: _Route, ctx: int) -> int | None:
    """The cap on generated tokens (None: none), from the fields the route reads; the
    last one read wins (a native route's ``n_predict`` over its ``max_tokens``)."""
    max_tokens = None
    for name in route.lenient + route.tokens:
        if name in route.lenient and not isinstance(body.get(name), (int, float)):
            continue  # llama-server ignores it
        value = _number(body, name)
        if value is None:
            continue
        if not -1 <= value <= MAX_TOKENS_CAP:
            raise BadRequest(f"'{name}' must be from -1 to {MAX_TOKENS_CAP}", param=name)
        if ctx and value > ctx:
            raise BadRequest(f"'{name}' is {value}; the context holds {ctx} tokens (CTX)",
                             code="context_length_exceeded", param=name)
        max_tokens = value if value > 0 else None
    return max_tokens


def _prompts(prompt: object) -> int:
    """How many prompts llama-server makes of a text completion's ``prompt``: a list of
    strings or of token lists is several, a list of token ids (with strings among them or
    not) is one, as its tokenize_input_prompts reads them."""
    if not isinstance(prompt, list) or not prompt:
        return 1
    first = prompt[0]
    if _is_int(first) or (isinstance(first, str) and any(_is_int(p) for p in prompt)):
        return 1
    return len(prompt)


def _check_prompt_size(fields: tuple[str, ...], body: dict[str, Any], max_bytes: int,
                       ctx: int) -> None:
    sizes = {name: _text_size(body[name]) for name in fields if name in body}
    if not sizes:
        return
    field = max(sizes, key=lambda name: sizes[name][0])  # named in the error
    size = sum(found[0] for found in sizes.values())
    ids = sum(found[1] for found in sizes.values())
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
