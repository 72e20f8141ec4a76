"""Runs the real service (`llamagate serve`) as a subprocess on free ports, and finds the
llama-server binary for the tests that run it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import requests

from backend.binary import find_llama_server
from tests.support.fake_llama import FakeLlama
from tests.support.keytool import KeyTool
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server() -> Path:
    explicit = os.environ.get("LLAMA_SERVER_PATH")
    return find_llama_server(Path(explicit) if explicit else None)


def gated_llama_server(tmp: Path, gate: Path) -> Path:
    """A wrapper that starts the real llama-server only once `gate` exists, so a
    test can hold the backend in its loading state for as long as it needs."""
    script = tmp / "gated-llama-server"
    script.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.02; done\n'
                      f'exec "{llama_server()}" "$@"\n')
    script.chmod(0o755)
    return script


class Service:
    def __init__(self, tmp: Path, env: dict[str, str], own_group: bool = False,
                 args: tuple[str, ...] = ()) -> None:
        # own_group: serve leads its own process group (and session), so a test can signal
        # that whole group (`kill -- -PGID`) without signalling the test runner;
        # args: `llamagate serve`'s command line after `serve` (flags)
        self.own_group = own_group
        self.args = args
        self.port, self.port_health = free_port(), free_port()
        self.log_path = tmp / f"service-{self.port}.log"
        self.env = {**os.environ, "PORT": str(self.port), "PORT_HEALTH": str(self.port_health),
                    "PORT_BACKEND": "0", "HOST": "127.0.0.1", "DATA_DIR": str(tmp / "data"),
                    "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
                    # one llama.cpp thread: its spinning threadpool collapses when the
                    # 2-core test machine is oversubscribed
                    "THREADS": "1", **env}
        self.env.setdefault("LLAMA_SERVER_PATH", str(llama_server()))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port_health}"

    def start(self) -> Service:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop/wait_exit)
        self.proc = subprocess.Popen([sys.executable, "-m", "llamagate.cli", "serve", *self.args],
                                     cwd=ROOT,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=self.own_group)
        return self

    def ping(self) -> int | None:
        try:
            return requests.get(f"{self.health_url}/ping", timeout=2).status_code
        except requests.RequestException:
            return None

    def gateway_up(self) -> bool:
        try:
            requests.get(f"{self.url}/ping", timeout=2)
        except requests.RequestException:
            return False
        return True

    def health(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.health_url}/health", timeout=2).json())

    def wait_ready(self, timeout: float = 60.0) -> Service:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            return self.ping() == 200
        wait_for(ready, "the service to be ready", within=timeout)
        return self

    @contextlib.contextmanager
    def running(self, timeout: float = 60.0) -> Iterator[Service]:
        """Started and ready for the block; stopped after it, whatever happens."""
        self.start()
        try:
            yield self.wait_ready(timeout)
        finally:
            self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = 60.0) -> int:
        """For a service expected to exit by itself; returns its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self._log.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.asynccontextmanager
async def two_worker_service(tmp_path: Path, backend: FakeLlama, keys: KeyTool,
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
