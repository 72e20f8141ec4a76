"""Helpers for the gateway tests: serving the app on 127.0.0.1, waiting on
conditions with deadlines, raw connections a test can drop, SSE parsing."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from core.config import load_config
from gateway.app import Served, Wiring, create_app, serve
from gateway.state import APP_STATE, AppState
from tests.gateway.fake_upstream import BACKEND_KEY, MODEL


async def wait_until(cond: Callable[[], Any | Awaitable[Any]], within: float = 5.0,
                     what: str = "condition") -> Any:
    """Poll `cond` (sync or async) until it is truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)  # poll period of a deadline wait


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


async def serve_gateway(backend_url: str, env: dict[str, str], models: tuple[str, ...] = (MODEL,),
                        backend_key: str | None = BACKEND_KEY, ready: bool = True,
                        extra_routes: list[web.RouteDef] | None = None) -> Gateway:
    """The gateway app, as `gateway.worker` runs it, on a free port of 127.0.0.1
    (`extra_routes`: test-only handlers added to it)."""
    config = load_config({"AUTH_ENABLED": "false", **env})
    app = create_app(config, Wiring(backend_url=backend_url, backend_key=backend_key,
                                    runtime_dir=None, models=models))
    app.add_routes(extra_routes or [])
    served = await serve(app, "127.0.0.1", 0)
    gateway = Gateway(app, served, f"http://127.0.0.1:{served.port}")
    if ready:
        # the first /health poll of the backend runs at startup; wait for its answer
        await wait_until(lambda: gateway.state.upstream.status.ready, 10, "the backend to be ready")
    return gateway


class RawRequest:
    """An HTTP/1.1 request on its own socket, so a test can drop the connection at a
    moment of its choosing (as a browser tab closing does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def send(cls, url: str, path: str, body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> RawRequest:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        data = json.dumps(body).encode() if body is not None else b""
        lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1",
                 f"Host: {parts.hostname}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return cls(reader, writer)

    async def read_head(self, within: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), within)

    async def read_until(self, marker: bytes, within: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(marker), within)

    async def drop(self) -> float:
        """Close the connection; returns when it was closed (time.monotonic)."""
        self.writer.close()
        closed = time.monotonic()
        await self.writer.wait_closed()
        return closed


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


def promtool_check(text: str) -> None:
    """Run `promtool check metrics` on an exposition and fail on any problem it reports.

    Without promtool the test is skipped, except in CI (env CI set), where it fails:
    there the check must really run."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (Debian package `prometheus`), and CI is set")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60, check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    problems = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode in (0, 3), f"promtool could not parse the exposition:\n{output}"
    assert not problems, "promtool check metrics:\n" + "\n".join(problems)


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """Samples of a text exposition, by name and labels."""

    @classmethod
    def parse(cls, text: str) -> Samples:
        samples = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def get_value(self, name: str, **labels: str) -> float | None:
        return self.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples named `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.items() if n == name and want <= ls)


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[str, Samples]:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return text, Samples.parse(text)
