"""A real llama-server of the test's own (as BACKEND_URL would name one), started with the
flags a test needs (`--embeddings`, `--reranking`, several slots), demanding a key; or a
router (llama-server's multi-model mode) serving the models of a preset file."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
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
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """terminate → wait → kill, as llama.cpp's own server tests stop it."""
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


class LlamaProcess:
    """A real llama-server on a port of its own that a test may SIGKILL, SIGSTOP and start
    again on the same port (an upstream of a pool); ``alias`` may name several models
    (``A,B``: llama-server answers to each)."""

    def __init__(self, tmp: Path, model: Path, alias: str, key: str, parallel: int = 2,
                 ctx: int = 4096) -> None:
        self.port = free_port()
        self.key = key
        self.log_path = tmp / f"llama-server-{self.port}.log"
        key_file = tmp / f"llama-{self.port}.key"
        runtime.write_secret(key_file, key)
        self.argv = build_argv(ServerSpec(binary=llama_server(), model_path=model, alias=alias,
                                          port=self.port, api_key_file=key_file, ctx=ctx,
                                          parallel=parallel, threads=1))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LlamaProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"llama-server exited: see {self.log_path}"
            return _healthy(self.url)

        wait_for(up, "llama-server to answer /health", within=60)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped one must run to take SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
