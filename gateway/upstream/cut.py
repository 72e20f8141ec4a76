"""What a request cut short used. The client hung up, the backend died, or its timeout or
the shutdown grace ended it: the final event with the backend's usage never came, yet the
backend did the work, and a client that reads 1,999 of 2,000 tokens and hangs up must pay
for them.

Completion tokens are the token events relayed to the client (``generated``), counted as
each chunk passes by the marker its API puts in every such event (``MARKERS``): llama-server
sends one event per sampled token, except that a token ending inside a UTF-8 character is
held back and sent with the next, so this may count a few tokens fewer, never more.

Prompt tokens are charged once the request was handed to the backend (``ex.forwarded``):
its prompt was read, or was being read. They are counted by the backend itself where it
can (a chat through /apply-template and /tokenize, a text prompt through /tokenize, an
Anthropic stream from its first event, which carries them), with a short deadline; where
it cannot (it died, or the API's shape has no counting route) by the gateway's estimate
(gateway/policy/validation.py, bytes / 4), and the access line says ``tokens_estimated``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from gateway.exchange import Exchange
from gateway.observe.metering import anthropic_input_tokens
from gateway.policy.validation import estimated_prompt_tokens
from gateway.state import AppState
from gateway.upstream.client import BackendError

# route → (the bytes each token event of its stream holds, the bytes of events among those
# that are not tokens): a chat stream opens each choice with an event that only names the
# role; llama-server's native stream (/completion) marks each token event "stop":false, and
# so its prompt-progress events (return_progress), which carry no token
_NATIVE: Final = (b'"stop":false', b'"prompt_progress"')
MARKERS: Final[dict[str, tuple[bytes, bytes]]] = {
    "/v1/chat/completions": (b'"delta":{"', b'"delta":{"role"'),
    "/v1/completions": (b'"finish_reason":null', b""),
    "/v1/messages": (b'"type":"content_block_delta"', b""),
    "/v1/responses": (b'.delta","', b""),
    "/completion": _NATIVE,
    "/completions": _NATIVE,
    "/infill": _NATIVE,
}
# routes whose answer may carry no counts (llama-server's native embeddings, and its OpenAI
# route given `content`): their prompt is counted as a cut request's is, once answered
COUNTED_AFTER: Final = frozenset({"/embedding", "/embeddings", "/v1/embeddings"})
# a text prompt's routes: `prompt` is a string, token ids, or several of those
_TEXT: Final = frozenset({"/v1/completions", "/completion", "/completions"})
# inputs of one embeddings request counted one by one; more are estimated
_MAX_COUNTED_INPUTS: Final = 16
# how long a cut request's prompt may take to count: the slot is already given back
COUNT_DEADLINE: Final = 1.0


def token_events(chunk: bytes, marker: tuple[bytes, bytes]) -> int:
    """The token events in ``chunk`` (whole events: the relay holds back a split one)."""
    count = chunk.count(marker[0])
    return count - chunk.count(marker[1]) if marker[1] else count


def needs_charge(ex: Exchange) -> bool:
    """Handed to the backend, ended before its usage came: the backend's work is unpaid."""
    return ex.inference and ex.forwarded and ex.tokens is None and not ex.completed


async def charge(state: AppState, ex: Exchange, path: str, body: dict[str, Any] | None) -> None:
    """``ex.tokens`` for a request cut short: its prompt, and the tokens relayed. Runs to
    the end (at most COUNT_DEADLINE) even if the request's task is cancelled meanwhile, as
    it is when the client leaves after the stream's error event; the cancellation is
    raised afterwards."""
    counting = asyncio.create_task(_counted_prompt(state, ex, path, body))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COUNT_DEADLINE
    cancelled: asyncio.CancelledError | None = None
    while not counting.done() and loop.time() < deadline:
        try:
            await asyncio.wait({counting}, timeout=deadline - loop.time())
        except asyncio.CancelledError as exc:  # owed all the same: finish counting first
            cancelled = exc
    prompt: int | None = None
    if counting.done() and not counting.cancelled():
        failure = counting.exception()
        if failure is None:
            prompt = counting.result()
        elif not isinstance(failure, (BackendError, OSError, ValueError)):
            raise failure
    else:
        counting.cancel()  # the backend is gone or slow: the estimate below
    if prompt is None:
        prompt = estimated_prompt_tokens(path, body)
        ex.estimated = True
    ex.tokens = (prompt, ex.generated)
    if cancelled is not None:
        raise cancelled


async def _counted_prompt(state: AppState, ex: Exchange, path: str,
                          body: dict[str, Any] | None) -> int | None:
    if path == "/v1/messages" and ex.head:
        return anthropic_input_tokens(ex.head)
    if body is None or ex.tasks > 1:
        return None  # several prompts or choices: the estimate
    model = {} if ex.model == "-" else {"model": ex.model}
    if path == "/v1/chat/completions":
        template = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        applied = await _post(state, ex, "/apply-template", {**template, **model})
        text = applied.get("prompt") if applied is not None else None
        return None if not isinstance(text, str) else await _tokens(state, ex, text, model)
    if path in _TEXT:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return await _input_tokens(state, ex, prompt, model)
    if path in COUNTED_AFTER:  # each input is one prompt
        inputs = body.get("input", body.get("content"))
        if not isinstance(inputs, list) or not inputs or isinstance(inputs[0], int):
            return await _input_tokens(state, ex, inputs, model)
        if len(inputs) > _MAX_COUNTED_INPUTS:
            return None
        total = 0
        for item in inputs:
            counted = await _input_tokens(state, ex, item, model)
            if counted is None:
                return None
            total += counted
        return total
    return None


async def _input_tokens(state: AppState, ex: Exchange, prompt: object,
                        model: dict[str, str]) -> int | None:
    """One prompt's tokens: a string's as llama-server tokenizes it, token ids counted."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids
    return await _tokens(state, ex, prompt, model) if isinstance(prompt, str) else None


async def _tokens(state: AppState, ex: Exchange, text: str, model: dict[str, str]) -> int | None:
    # add_special: the BOS token llama-server puts before a prompt counts, as in its usage
    tokens = await _post(state, ex, "/tokenize", {"content": text, "add_special": True, **model})
    found = tokens.get("tokens") if tokens is not None else None
    return len(found) if isinstance(found, list) else None


async def _post(state: AppState, ex: Exchange, path: str,
                body: dict[str, Any]) -> dict[str, Any] | None:
    pool = state.pool
    upstream = state.upstream if pool is None else pool.upstream_of(ex)
    resp = await upstream.send("POST", path, json.dumps(body).encode(), "application/json",
                               ex.request_id)
    try:
        answer = await resp.read()
    finally:
        resp.close()
    if resp.status != 200:
        return None
    parsed = json.loads(answer)
    return parsed if isinstance(parsed, dict) else None
