"""A real llama-server of the test's own (as BACKEND_URL would name one), started with the
flags a test needs (`--embeddings`, `--reranking`, several slots), demanding a key; or a
router (llama-server's multi-model mode) serving the models of a preset file."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from backend.argv import ServerSpec, build_argv, build_env
from core import runtime
from tests.support.service import free_port, llama_server
from tests.support.wait import wait_for


@dataclass(frozen=True)
class LlamaServer:
    url: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@contextlib.contextmanager
def running_llama_server(tmp: Path, model: Path | None, *extra: str, alias: str = "tiny",
                         parallel: int = 2, ctx: int = 4096,
                         preset: Path | None = None) -> Iterator[LlamaServer]:
    """llama-server on a free port of 127.0.0.1 serving ``model`` as ``alias`` (or, with
    ``preset``, a router serving its models), up (its /health 200) for the block, then
    stopped: terminate, wait, kill."""
    key = secrets.token_urlsafe(16)
    key_file = tmp / f"llama-{alias}.key"
    runtime.write_secret(key_file, key)
    port = free_port()
    spec = ServerSpec(binary=llama_server(), model_path=model, alias=alias, port=port,
                      api_key_file=key_file, ctx=ctx, parallel=parallel, threads=1,
                      extra_args=extra, models_preset=preset, models_max=2)
    server = LlamaServer(f"http://127.0.0.1:{port}", key)
    with open(tmp / f"llama-server-{alias}.log", "wb") as log:
        proc = subprocess.Popen(build_argv(spec), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **build_env(spec)})
        try:
            def up() -> bool:
                assert proc.poll() is None, f"llama-server exited: see {log.name}"
                return _healthy(server.url)

            wait_for(up, "llama-server to answer /health", within=60)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False
