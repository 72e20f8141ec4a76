"""The tests' one fake llama-server, with misbehaviour switches, for the faults the real one
will not produce on demand (after llama-swap's `cmd/simple-responder`).

It answers the routes the gateway uses the way llama-server does (JSON replies with
`usage` and `timings`, SSE streams ending in a `timings` event and `[DONE]`, errors
in llama-server's `{"error": {"code", "message", "type"}}` shape) and can instead:
answer with an error status, hang before sending headers, stream slowly, stream
one event at a time on the test's signal, hang mid-stream, die mid-stream by
closing its transport, send a JSON reply chunked or cut short, or drop a
connection without answering (as a server closing an idle keep-alive connection
just as a request arrives does).

Every request but the gateway's own /health polls and /metrics scrapes is recorded as a
`Seen`, which says whether the gateway closed the connection before the fake had finished:
that is how tests prove cancellation. `requests()` leaves the model listing out (the
gateway may fetch it for itself); `routes()` names every request, the listing included.
The fake runs with handler cancellation, so a dropped connection cancels the
handler wherever it is waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from aiohttp import web

from tests.support.wait import wait_until

BACKEND_KEY = "backend-secret"
MODEL = "tiny"


# a few families of llama-server's /metrics, as it writes them
BACKEND_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 14
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 2047
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""


@dataclass
class Switches:
    """How the next requests are answered; a test changes them before sending."""

    status: int = 200  # anything else: that status with llama-server's error body
    error_message: str = "the fake backend refused this request"
    hang_before_headers: bool = False  # wait for `release` (or the client) before answering
    events: int = 3  # content events in a stream, before the final `timings` event
    chunk_delay: float = 0.0  # pause between stream events: a slow backend
    step: bool = False  # send each event after the first only once `proceed` is set
    hang_after: int | None = None  # stop after this many events and wait for `release`
    die_after: int | None = None  # close the transport after this many events
    torn: bool = False  # before that hang or death, write the first half of the next event
    final_pieces: int = 1  # write the final event in this many pieces (gated by `step`)
    health_status: int = 200
    health_hang: bool = False  # /health waits for `release` (once set, it stays set)
    chunked_reply: bool = False  # send the JSON reply with chunked encoding, in pieces
    truncate_reply: bool = False  # announce the JSON reply's length, send half of it, close
    drop_requests: int = 0  # close the connection of the next this many requests, unanswered
    prompt_tokens: int = 7
    unloadable: frozenset[str] = frozenset()  # models answered as llama-server's router does
    cache_tokens: int = 4  # of the prompt tokens, reused from the KV cache (timings.cache_n)
    models: tuple[str, ...] = (MODEL,)  # what /v1/models lists
    # a stream runs to the request's max_tokens, as a model that never stops does (else `events`)
    events_from_max_tokens: bool = False


# Token counts a test can do sums with: two models served, a prompt of PROMPT_TOKENS none of
# them cached, every completion as long as its max_tokens.
PROMPT_TOKENS = 5
METERED = Switches(models=(MODEL, "other"), prompt_tokens=PROMPT_TOKENS, cache_tokens=0,
                   events_from_max_tokens=True)


@dataclass(eq=False)
class Seen:
    """One request as the fake received it, and how it ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str = ""  # the client's address and port: which connection carried the request
    query: str = ""  # the query string, as it arrived
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False  # the fake closed the connection without answering (drop_requests)
    client_closed: bool = False  # the gateway dropped the connection before we were done
    closed_at: float | None = None

    def json(self) -> Any:
        return json.loads(self.body)


def error_body(status: int, message: str) -> dict[str, Any]:
    """llama-server's error shape (note: `code` is the HTTP status, an int)."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            501: "not_supported_error", 503: "unavailable_error"}.get(status, "server_error")
    return {"error": {"code": status, "message": message, "type": kind}}


class FakeLlama:
    def __init__(self, switches: Switches | None = None) -> None:
        self.switches = replace(switches) if switches is not None else Switches()
        self.seen: list[Seen] = []
        self.release = asyncio.Event()  # ends every hang
        self.proceed = asyncio.Event()  # lets a stepped stream send its next event
        self.sent_events = 0  # stream events written so far, over all requests
        self.final_pieces_sent = 0  # pieces of final events written (Switches.final_pieces)
        self.url = ""
        self.on_health: Callable[[], None] | None = None  # called as each /health poll arrives
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._tracked(self._models))
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._tracked(self._completion))
        app.router.add_post("/v1/completions", self._tracked(self._completion))
        app.router.add_post("/v1/embeddings", self._tracked(self._embeddings))
        app.router.add_route("*", "/{tail:.*}", self._tracked(self._not_found))
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        self.release.set()  # let held handlers finish so the server stops promptly
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what tests read -------------------------------------------------------------
    def requests(self, path: str | None = None) -> list[Seen]:
        """The requests to `path`; without one, all but the model listing's."""
        if path is None:
            return [s for s in self.seen if (s.method, s.path) != ("GET", "/v1/models")]
        return [s for s in self.seen if s.path == path]

    def routes(self, listing: bool = True) -> list[str]:
        """"METHOD /path" of every request seen, in order (`listing`: with GET /v1/models)."""
        return [f"{s.method} {s.path}" for s in (self.seen if listing else self.requests())]

    async def wait_for_requests(self, n: int, path: str | None = None,
                                within: float = 5.0) -> list[Seen]:
        """Wait until at least `n` requests (to `path`) have arrived."""
        await wait_until(lambda: len(self.requests(path)) >= n,
                         f"{n} requests to {path or 'any path'} at the fake backend", within=within)
        return self.requests(path)

    # -- handlers --------------------------------------------------------------------
    def _tracked(self, handler: Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            seen = Seen(request.method, request.path, dict(request.headers), await request.read(),
                        peer=str(request.transport.get_extra_info("peername")
                                 if request.transport else None), query=request.query_string)
            self.seen.append(seen)
            if self.switches.drop_requests > 0:
                self.switches.drop_requests -= 1
                seen.dropped = True
                assert request.transport is not None
                request.transport.close()  # not one byte of an answer
                seen.finished.set()
                return web.Response()  # never sent: the transport is closed
            try:
                return await handler(request, seen)
            except (asyncio.CancelledError, ConnectionResetError):
                seen.client_closed, seen.closed_at = True, time.monotonic()
                raise
            finally:
                seen.finished.set()
        return wrapper

    async def _health(self, request: web.Request) -> web.Response:
        if self.on_health is not None:
            self.on_health()
        if self.switches.health_hang:
            await self.release.wait()
        if self.switches.health_status != 200:
            return web.json_response(error_body(self.switches.health_status, "Loading model"),
                                     status=self.switches.health_status)
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request, seen: Seen) -> web.Response:
        models = self.switches.models
        return web.json_response({
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "llamacpp"}
                     for m in models],
            "models": [{"name": m, "model": m} for m in models]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=BACKEND_METRICS)

    async def _not_found(self, request: web.Request, seen: Seen) -> web.Response:
        return web.json_response(error_body(404, "File Not Found"), status=404)

    async def _embeddings(self, request: web.Request, seen: Seen) -> web.Response:
        return web.json_response({"object": "list", "model": MODEL, "data": [
            {"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    async def _completion(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        sw = self.switches
        if sw.hang_before_headers:
            await self.release.wait()
        if sw.status != 200:
            return web.json_response(error_body(sw.status, sw.error_message), status=sw.status)
        body = seen.json()
        if body.get("model") in sw.unloadable:
            return web.json_response(error_body(500, f"model name={body['model']} failed to load"),
                                     status=500)
        chat = request.path.endswith("/chat/completions")
        model = str(body.get("model") or MODEL)  # llama-server names the model asked for
        if body.get("stream"):
            # like llama-server: usage in a last chunk of its own when the request asks for
            # it; such a request (the gateway's form of a non-streaming one) gets max_tokens
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            by_max_tokens = include_usage or sw.events_from_max_tokens
            events = int(body.get("max_tokens") or sw.events) if by_max_tokens else sw.events
            return await self._stream(request, chat, events, include_usage, model)
        n = int(body.get("max_tokens") or sw.events)
        text = "x" * n
        choice: dict[str, Any] = (
            {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text}}
            if chat else {"index": 0, "finish_reason": "length", "text": text})
        reply = web.json_response({
            "id": "fake-1", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": sw.prompt_tokens, "completion_tokens": n,
                      "total_tokens": sw.prompt_tokens + n},
            "timings": self._timings(n)})
        if sw.chunked_reply or sw.truncate_reply:
            return await self._send_in_pieces(request, reply)
        return reply

    async def _send_in_pieces(self, request: web.Request, reply: web.Response) -> web.StreamResponse:
        data = bytes(cast(bytes, reply.body))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.switches.truncate_reply:
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[:len(data) // 2])
            assert request.transport is not None
            request.transport.close()  # the backend dies with half the body sent
            return response
        response.enable_chunked_encoding()
        await response.prepare(request)
        third = -(-len(data) // 3)
        for at in range(0, len(data), third):
            await response.write(data[at:at + third])
        await response.write_eof()
        return response

    def _timings(self, n: int) -> dict[str, Any]:
        sw = self.switches
        return {"cache_n": sw.cache_tokens, "prompt_n": sw.prompt_tokens - sw.cache_tokens,
                "predicted_n": n, "prompt_ms": 1.0, "predicted_ms": 1.0}

    async def _stream(self, request: web.Request, chat: bool, events: int,
                      include_usage: bool, model: str) -> web.StreamResponse:
        sw = self.switches
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(events):
            if i == 1 and sw.truncate_reply:
                assert request.transport is not None
                request.transport.close()  # the backend dies with part of the answer sent
                return response
            if sw.torn and i in (sw.hang_after, sw.die_after):
                half = _event(_chunk(model, chat, {"content": f"t{i}"}, None))
                await response.write(half[:len(half) // 2])
            if i == sw.hang_after:
                await self.release.wait()
            if i == sw.die_after:
                assert request.transport is not None
                request.transport.close()  # the backend dies: no terminating chunk
                return response
            if i > 0 and sw.step:
                await self.proceed.wait()
                self.proceed.clear()
            if i > 0 and sw.chunk_delay:
                await asyncio.sleep(sw.chunk_delay)  # the misbehaviour itself: a slow backend
            await response.write(_event(_chunk(model, chat, {"content": f"t{i}"}, None)))
            self.sent_events += 1
        final = _chunk(model, chat, {}, "length")
        data = b""
        if include_usage:
            data = _event(final)
            final = {**_chunk(model, chat, {}, None), "choices": [],
                     "usage": {"prompt_tokens": sw.prompt_tokens, "completion_tokens": events,
                               "total_tokens": sw.prompt_tokens + events}}
        final["timings"] = self._timings(events)
        data += _event(final) + b"data: [DONE]\n\n"
        size = -(-len(data) // sw.final_pieces)
        for at in range(0, len(data), size):
            if at and sw.step:
                await self.proceed.wait()
                self.proceed.clear()
            await response.write(data[at:at + size])
            self.final_pieces_sent += 1
        await response.write_eof()
        return response


def _chunk(model: str, chat: bool, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
    return {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0, "model": model, "choices": [choice]}


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
