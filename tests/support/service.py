"""Runs the real service (`llamagate serve`) as a subprocess on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from backend.binary import find_llama_server

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server() -> Path:
    explicit = os.environ.get("LLAMA_SERVER_PATH")
    return find_llama_server(Path(explicit) if explicit else None)


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def gated_llama_server(tmp: Path, gate: Path) -> Path:
    """A wrapper that starts the real llama-server only once `gate` exists, so a
    test can hold the backend in its loading state for as long as it needs."""
    script = tmp / "gated-llama-server"
    script.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.02; done\n'
                      f'exec "{llama_server()}" "$@"\n')
    script.chmod(0o755)
    return script


class Service:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
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
        self.proc = subprocess.Popen([sys.executable, "-m", "llamagate.cli", "serve"], cwd=ROOT,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
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
        wait_for(ready, timeout, "the service to be ready")
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
