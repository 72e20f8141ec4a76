"""A real llama-server with NO key (the BACKEND_URL setup issue 21 found open to hidden
requests), started for a test, and the gateway in front of it in BACKEND_URL mode."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp

from backend.argv import ServerSpec, build_argv
from tests.support.gateway import Gateway, serve_gateway
from tests.support.llama import stop
from tests.support.metrics import Samples
from tests.support.service import free_port, llama_server
from tests.support.wait import wait_until


@contextlib.asynccontextmanager
async def keyless_llama_server(tmp: Path, model: Path, ctx: int = 2048) -> AsyncIterator[str]:
    """llama-server on a free port without --api-key-file; yields its base URL."""
    port = free_port()
    spec = ServerSpec(binary=llama_server(), model_path=model, alias="tiny", port=port,
                      api_key_file=tmp / "unused.key", ctx=ctx, parallel=1, threads=1)
    argv = build_argv(spec)
    at = argv.index("--api-key-file")
    del argv[at:at + 2]  # no key: anyone who reaches its port may run anything
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(argv, tmp / "llama-server.log")
    try:
        async with aiohttp.ClientSession() as http:
            async def up() -> bool:
                assert proc.poll() is None, "llama-server died at startup"
                try:
                    async with http.get(f"{url}/health") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False
            await wait_until(up, "llama-server's /health", within=60)
        yield url
    finally:
        stop(proc)


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def gateway_before(url: str, settings: Mapping[str, str] | None = None
                         ) -> AsyncIterator[Gateway]:
    """The gateway in BACKEND_URL mode, no backend key, in front of ``url``."""
    async with serve_gateway(url, dict(settings or {}), models=("tiny",),
                             backend_key=None) as gateway:
        yield gateway


async def work_done(url: str) -> tuple[float, float]:
    """llama-server's own counters: (tokens predicted, prompt tokens) since it started."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        assert r.status == 200
        samples = Samples.parse(await r.text())
    return (samples.total("llamacpp:tokens_predicted_total"),
            samples.total("llamacpp:prompt_tokens_total"))
