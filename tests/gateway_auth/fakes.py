"""A fake llama-server with switches, the gateway served in-process in front of it, and a
key_mgmt runner that remembers every secret it printed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from core.config import Config
from gateway.app import Wiring, create_app, serve
from gateway.state import APP_STATE, AppState
from keys.cli import main as keys_main
from tests.support.service import Service

MODELS = ("tiny", "other")
PROMPT_TOKENS = 5


@dataclass
class FakeBackend:
    """Answers like llama-server; records every request but the gateway's own /health polls
    and /metrics scrapes."""

    seen: list[str] = field(default_factory=list)
    # Streams wait on this after their first chunk, so a test can hold one open.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hold_streams: bool = False
    report_usage: bool = True
    refuse: bool = False  # answer inference requests 400, as llama-server does a bad one
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", _health)
        app.router.add_get("/metrics", _metrics)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.path}")
        if request.path == "/v1/models":
            return web.json_response({
                "object": "list", "data": [{"id": m, "object": "model"} for m in MODELS],
                "models": [{"name": m, "model": m} for m in MODELS]})
        if request.path not in ("/v1/chat/completions", "/v1/completions"):
            return web.json_response({"error": {"message": "not found", "code": 404}}, status=404)
        if self.refuse:
            return web.json_response({"error": {"code": 400, "message": "bad request",
                                                "type": "invalid_request_error"}}, status=400)
        body = await request.json()
        completion = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
                 "total_tokens": PROMPT_TOKENS + completion}
        if not body.get("stream"):
            reply: dict[str, Any] = {"id": "x", "object": "chat.completion", "created": 0,
                                     "model": body.get("model", "tiny"), "choices": [{
                                         "index": 0, "finish_reason": "length",
                                         "message": {"role": "assistant", "content": "hi"}}]}
            if self.report_usage:
                reply["usage"] = usage
            return web.json_response(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_event({"choices": [{"index": 0, "delta": {"content": "hi"}}]}))
        if self.hold_streams:
            await self.release.wait()
        await resp.write(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                                 "timings": {"prompt_n": PROMPT_TOKENS, "predicted_n": completion}}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @property
    def inference_seen(self) -> list[str]:
        return [s for s in self.seen if s != "GET /v1/models"]


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text="llamacpp:requests_processing 0\n")


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                   "model": "tiny", **obj}).encode() + b"\n\n"


@dataclass
class Served:
    url: str
    state: AppState
    app: web.Application


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def wait_until(cond: Callable[[], object], what: str, within: float = 10.0) -> None:
    """Yield to the loop until ``cond()`` is true; fail after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            # for state that signals no event (backend readiness, the keys file on disk)
            while not cond():  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # a poll period, not synchronisation
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


@contextlib.asynccontextmanager
async def gateway(config: Config, backend_url: str,
                  clock: Callable[[], float] | None = None) -> AsyncIterator[Served]:
    """The gateway app served on 127.0.0.1, ready (backend seen healthy)."""
    app = create_app(config, Wiring(backend_url=backend_url, backend_key=None, runtime_dir=None,
                                    models=MODELS))
    state = app[APP_STATE]
    if clock is not None:
        state.clock = clock
    served = await serve(app, "127.0.0.1", 0)
    try:
        await wait_until(lambda: state.upstream.status.ready, "the fake backend to be ready")
        yield Served(f"http://127.0.0.1:{served.port}", state, app)
    finally:
        await served.close()


def base_config(tmp: Path, **overrides: Any) -> Config:
    data = tmp / "data"
    config = Config(data_dir=data, auth_enabled=True, auth_keys_file=data / "keys.json",
                    usage_db=data / "usage.db", usage_flush_interval=0.05,
                    keys_reload_interval=0.0, max_queue_size=8, queue_timeout=5.0)
    return replace(config, **overrides)


@dataclass
class KeyTool:
    """Runs key_mgmt in-process on one store; every secret it prints is remembered."""

    keys_file: Path
    usage_db: Path
    secrets: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time

    def run(self, *argv: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = keys_main(["--keys-file", str(self.keys_file), "--usage-db", str(self.usage_db),
                            *argv], environ={}, clock=self.clock)
        return rc, out.getvalue() + err.getvalue()

    def ok(self, *argv: str) -> str:
        rc, out = self.run(*argv)
        assert rc == 0, out
        return out

    def generate(self, name: str, *options: str) -> tuple[str, str]:
        """Create a key; returns (id, secret)."""
        created = json.loads(self.ok("generate", "--name", name, "--json", *options))
        self.secrets.append(created["secret"])
        return created["id"], created["secret"]

    def rotate(self, key_id: str, grace: str) -> str:
        rotated = json.loads(self.ok("rotate", key_id, "--grace", grace, "--json"))
        self.secrets.append(rotated["secret"])
        return str(rotated["secret"])


@contextlib.asynccontextmanager
async def two_worker_service(tmp_path: Path, backend: FakeBackend, keys: KeyTool,
                             **env: str) -> AsyncIterator[Service]:
    """The real service with GATEWAY_WORKERS=2 before ``backend``, auth on with ``keys``,
    the access log on (``worker_pids`` reads it); stopped after the block."""
    svc = Service(tmp_path, {"BACKEND_URL": backend.url, "AUTH_ENABLED": "true",
                             "AUTH_KEYS_FILE": str(keys.keys_file), "USAGE_DB": str(keys.usage_db),
                             "GATEWAY_WORKERS": "2", "LOG_LEVEL": "info", **env})
    await asyncio.to_thread(svc.start)
    try:
        await asyncio.to_thread(svc.wait_ready)
        yield svc
    finally:
        await asyncio.to_thread(svc.stop)


def worker_pids(svc: Service) -> set[int]:
    """The gateway workers that answered requests, from the service's access log."""
    return {json.loads(line)["worker_pid"] for line in svc.log().splitlines()
            if '"logger":"llamagate.access"' in line}
