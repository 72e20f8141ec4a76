"""The gateway app served in-process on 127.0.0.1 (layer 2), as `gateway.worker` runs it,
and what the tests read from its answers: OpenAI error envelopes and SSE events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
from aiohttp import web

from core.config import Config, load_config
from gateway.app import Served, Wiring, create_app, serve
from gateway.router import PUBLIC, Handler
from gateway.state import APP_STATE, AppState
from tests.support.fake_llama import BACKEND_KEY, MODEL
from tests.support.wait import wait_until

ExtraRoute = tuple[list[str], str, Handler]


@dataclass
class Gateway:
    app: web.Application
    served: Served
    url: str

    @property
    def state(self) -> AppState:
        return self.app[APP_STATE]

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def sdk(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """The official client, without retries (so each call is one request)."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                  **kwargs)

    async def stop(self) -> None:
        await self.served.close()


@contextlib.asynccontextmanager
async def serve_gateway(backend_url: str, settings: Config | Mapping[str, str], *,
                        models: tuple[str, ...] = (MODEL,), backend_key: str | None = BACKEND_KEY,
                        ready: bool = True, extra_routes: list[ExtraRoute] | None = None,
                        clock: Callable[[], float] | None = None) -> AsyncIterator[Gateway]:
    """The gateway app on a free port of 127.0.0.1 for the block, stopped after it.

    ``settings``: a Config, or environment variables read as `load_config` reads them (auth
    off unless they say otherwise); ``extra_routes``: test-only public routes (methods,
    path, handler) added to its table;
    ``clock``: the app's clock (time.time unless given); ``ready``: wait for the backend's
    first /health answer before the block."""
    config = settings if isinstance(settings, Config) else load_config(
        {"AUTH_ENABLED": "false", **settings})
    app = create_app(config, Wiring(backend_url=backend_url, backend_key=backend_key,
                                    runtime_dir=None, models=models))
    for methods, path, handler in extra_routes or []:
        app[APP_STATE].router.add(methods, path, handler, PUBLIC)
    if clock is not None:
        app[APP_STATE].clock = clock
    served = await serve(app, "127.0.0.1", 0)
    gateway = Gateway(app, served, f"http://127.0.0.1:{served.port}")
    try:
        if ready:
            # the first /health poll of the backend runs at startup; wait for its answer
            await wait_until(lambda: gateway.state.upstream.status.ready, "the backend to be ready",
                             within=10)
        yield gateway
    finally:
        await gateway.stop()


def auth_config(tmp: Path, **overrides: Any) -> Config:
    """Auth on, the key store and usage database under ``tmp``/data, usage flushed and
    nothing reloaded on a timer unless ``overrides`` say otherwise."""
    data = tmp / "data"
    config = Config(data_dir=data, auth_enabled=True, auth_keys_file=data / "keys.json",
                    usage_db=data / "usage.db", usage_flush_interval=0.05,
                    keys_reload_interval=0.0, max_queue_size=8, queue_timeout=5.0)
    return replace(config, **overrides)


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def next_event(content: aiohttp.StreamReader, within: float = 5.0) -> str:
    """The next `data:` payload from a streamed response."""
    while True:
        line = await asyncio.wait_for(content.readline(), within)
        if not line:
            raise AssertionError("the stream ended before the next event")
        if line.startswith(b"data: "):
            return line[len(b"data: "):].decode().rstrip("\n")


def assert_openai_error(body: Any, type_: str, code: str) -> dict[str, Any]:
    """The gateway's own error envelope: {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert error["type"] == type_ and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)
