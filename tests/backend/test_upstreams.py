"""A pool's upstreams: BACKENDS_FILE read with every problem named, the order and duplicates
of the upstreams from every setting, the configuration's refusals, and serve's watch of one
upstream (models with aliases, total and busy slots, read with its key)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from backend.upstreams import (
    UpstreamReport,
    UpstreamSpec,
    UpstreamWatch,
    pool_specs,
    read_backends_file,
)
from core.config import ConfigError, load_config
from tests.support.service import free_port


def test_the_backends_file_gives_each_upstream_its_key_weight_and_models(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("backends:\n"
                    "  - http://a:8080\n"
                    "  - url: https://user:pw@b:8443/llama/\n    key: own\n    weight: 2\n"
                    "    models: [m1, m2]\n")
    a, b = read_backends_file(path, "shared")
    assert a == UpstreamSpec("http://a:8080", "shared")
    assert b == UpstreamSpec("https://user:pw@b:8443/llama", "own", 2.0, ("m1", "m2"))
    assert b.name == "b:8443/llama"  # never the URL's credentials


def test_a_bad_backends_file_names_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("- url: ftp://a\n- url: http://b\n  weight: 0\n- url: http://c\n  port: 1\n")
    with pytest.raises(ValueError) as raised:
        read_backends_file(path, None)
    message = str(raised.value)
    assert "entry 1: url must be" in message and "entry 2: weight" in message
    assert "entry 3: unknown field port" in message
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a list"):
        read_backends_file(path, None)


def test_the_pool_is_the_first_then_the_urls_then_the_file_each_once() -> None:
    first = UpstreamSpec("http://local:1", "k0")
    specs = pool_specs(("http://a:1", "http://b:1"), [UpstreamSpec("http://c:1", "kc")], first, "k")
    assert [s.url for s in specs] == ["http://local:1", "http://a:1", "http://b:1", "http://c:1"]
    assert [s.key for s in specs] == ["k0", "k", "k", "kc"]
    with pytest.raises(ValueError, match="named twice"):
        pool_specs(("http://a:1",), [UpstreamSpec("http://a:1")], None, None)


def test_the_configuration_refuses_a_pool_with_several_workers_or_a_profile() -> None:
    config = load_config({"BACKEND_URLS": "http://a:1, http://b:1/"})
    assert config.backend_urls == ("http://a:1", "http://b:1") and config.pool
    assert not config.supervise_backend
    for extra in ({"GATEWAY_WORKERS": "2"}, {"PROFILE": "p"}, {"BACKEND_URLS": "http://a,http://a"},
                  {"BACKEND_URLS": "a:1"}):
        with pytest.raises(ConfigError):
            load_config({"BACKEND_URLS": "http://a:1", **extra})


class Llama:
    """An upstream's /health, /v1/models, /props and /slots, answered only with its key."""

    def __init__(self) -> None:
        self.busy = 1
        app = web.Application()
        for path, body in (("/health", lambda: {"status": "ok"}),
                           ("/v1/models", lambda: {"data": [{"id": "A", "aliases": ["A", "B"]}]}),
                           ("/props", lambda: {"total_slots": 3}),
                           ("/slots", lambda: [{"is_processing": i < self.busy} for i in range(3)])):
            app.router.add_get(path, self._answer(body))
        self.runner = web.AppRunner(app)

    @staticmethod
    def _answer(body: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if request.path != "/health" and request.headers.get("Authorization") != "Bearer k":
                return web.json_response({"error": "Invalid API Key"}, status=401)
            return web.json_response(body())
        return handler


async def test_the_watch_reads_models_with_aliases_and_the_slots_with_the_key() -> None:
    llama = Llama()
    await llama.runner.setup()
    port = free_port()
    await web.TCPSite(llama.runner, "127.0.0.1", port).start()
    reports: asyncio.Queue[UpstreamReport] = asyncio.Queue()
    watch = UpstreamWatch(UpstreamSpec(f"http://127.0.0.1:{port}", "k", models=("B",)))
    task = asyncio.create_task(watch.follow(reports.put_nowait, interval=0.01))
    try:
        report = await asyncio.wait_for(reports.get(), 5)
        assert report == UpstreamReport("ready", True, ("A", "B"), slots=3, busy=1)
        # BACKENDS_FILE's models narrow what it lists
        assert report.published(watch.spec)["models"] == ["B"]
        llama.busy = 3
        while (await asyncio.wait_for(reports.get(), 5)).busy != 3:
            pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await llama.runner.cleanup()
