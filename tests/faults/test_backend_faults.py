"""Faults of the supervised llama-server, injected with real signals and files against the
real binary and the tiny model (issue 22).

- a SIGSTOPped llama-server turns the health port's /ping 503 within BACKEND_HANG_SECONDS
  (and the gateway's `llamagate_backend_up` 0, requests 503 with Retry-After); SIGCONT
  brings it back without a restart; one kept stopped past BACKEND_HANG_RESTART_SECONDS is
  killed and restarted;
- a busy llama-server (more streams than slots) still answers /health: never marked hung;
- the circuit breaker's count starts again after its probe succeeded;
- a deleted model is named in /health's last_error, and its return starts llama-server at
  once, not after the circuit's minute;
- the derived prompt-cache bound reaches llama-server's command line.

Each test bounds its waits (``wait_for(within=...)``); a test that stops llama-server
always lets it go again (SIGCONT) before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from backend.argv import ServerSpec
from backend.restarts import RestartPolicy
from backend.supervisor import BackendState, Snapshot, Supervisor
from tests.support.metrics import Samples
from tests.support.service import Service, free_port, llama_server
from tests.support.wait import wait_for, wait_until

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

HANG_SECONDS = 5.0  # BACKEND_HANG_SECONDS's default, the bound docs/operations.md promises
# what may come on top: the health process reads serve's state file every 0.1 s, serve
# publishes at once; a second of slack for a loaded 2-core machine
SLACK = 1.5


def _backend(svc: Service) -> dict[str, Any]:
    return dict(svc.health()["backend"])


def _pid(svc: Service) -> int:
    pid = _backend(svc)["pid"]
    assert isinstance(pid, int)
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[float]:
    """llama-server SIGSTOPped for the block (the time it was stopped given); always
    continued after it, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _backend_up(svc: Service) -> float:
    text = requests.get(f"{svc.url}/metrics", timeout=5).text
    return Samples.parse(text)[("llamagate_backend_up", frozenset())]


def test_a_stopped_llama_server_is_unhealthy_within_the_bound_and_healthy_after_sigcont(
        tmp_path: Path, tiny_model: Path) -> None:
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false"})
    with svc.running():
        pid = _pid(svc)
        assert _backend_up(svc) == 1
        with stopped(pid) as since:
            wait_for(lambda: svc.ping() == 503, "/ping to turn 503",
                     within=HANG_SECONDS + SLACK)
            took = time.monotonic() - since
            body = svc.health()
            assert body["backend"]["state"] == "unresponsive", body
            assert "has not answered /health" in body["backend"]["last_error"]
            # not long before the bound (the last answer came at most a probe period, 1 s,
            # before the stop): no false alarm
            assert took >= HANG_SECONDS - 1.5, took
            # the gateway worker reads serve's state file every 0.1 s too; a scrape that
            # began before it had waits up to 2 s on the stopped llama-server's /metrics
            wait_for(lambda: _backend_up(svc) == 0, "llamagate_backend_up 0", within=6)
            r = requests.post(f"{svc.url}/v1/completions",
                              json={"prompt": "a", "max_tokens": 2}, timeout=10)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert "unresponsive" in r.json()["error"]["message"]
        wait_for(lambda: svc.ping() == 200, "/ping to be 200 again after SIGCONT", within=5)
        assert _pid(svc) == pid and _backend(svc)["restarts"] == 0  # recovered, not restarted
        # the gateway worker reads the state file apart from the health process
        wait_for(lambda: _backend_up(svc) == 1, "llamagate_backend_up 1", within=2)
        r = requests.post(f"{svc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                          timeout=30)
        assert r.status_code == 200
    assert "refusing requests until it does" in svc.log() and "answers again" in svc.log()


def test_a_llama_server_kept_stopped_is_killed_and_restarted(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false", "BACKEND_HANG_SECONDS": "1",
                             "BACKEND_HANG_RESTART_SECONDS": "3"})
    with svc.running():
        pid = _pid(svc)
        with stopped(pid):
            wait_for(lambda: not _alive(pid), "the stopped llama-server to be killed", within=10)
            wait_for(lambda: _backend(svc)["state"] == "ready" and _pid(svc) != pid,
                     "a new llama-server", within=30)
        assert _backend(svc)["restarts"] == 1
        assert svc.ping() == 200
        assert "did not answer /health for 3s (BACKEND_HANG_RESTART_SECONDS)" in svc.log()


def test_a_busy_llama_server_is_not_taken_for_a_hung_one(tmp_path: Path,
                                                        tiny_model: Path) -> None:
    """Four times as many streams as slots, with a two-second bound: /health keeps
    answering from llama-server's HTTP threads (within 0.6 s at worst, measured on a loaded
    2-core machine, most often in 10 ms), so it never reads as hung. It has an HTTP thread
    to answer on: with llama-server's default (parallel + 2) the eight requests held them all
    and /health waited for a stream to end (backend/argv.py http_threads)."""
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false", "BACKEND_HANG_SECONDS": "2",
                             "PARALLEL": "2", "MAX_CONCURRENT_REQUESTS": "8"})
    with svc.running():
        tokens = [0] * 8
        done = threading.Event()

        def stream(i: int) -> None:
            body: dict[str, Any] = {"prompt": "once upon a time", "max_tokens": 2000,
                                    "stream": True}
            while not done.is_set():  # one stream after another until the test has sampled
                with requests.post(f"{svc.url}/v1/completions", json=body, stream=True,
                                   timeout=60) as r:
                    for line in r.iter_lines():
                        tokens[i] += line.startswith(b"data: {")
                        if done.is_set():
                            return

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(tokens))]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: sum(1 for n in tokens if n > 0) >= 2, "two streams generating",
                     within=20)
            states = set()
            deadline = time.monotonic() + 6  # three bounds under load
            while time.monotonic() < deadline:
                states.add(_backend(svc)["state"])
                time.sleep(0.05)  # sampling period of the state, not synchronisation
            assert states == {"ready"}, states
            assert sum(tokens) > 0
        finally:
            done.set()
            for t in threads:
                t.join(60)


def test_a_deleted_model_is_named_and_its_return_starts_llama_server_at_once(
        tmp_path: Path, tiny_model: Path) -> None:
    """BACKEND_MAX_RESTARTS=1: the crash opens the circuit (a minute's wait); the model's
    return must start llama-server within seconds all the same."""
    model = tmp_path / "models" / "served.gguf"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    svc = Service(tmp_path, {"MODEL_PATH": str(model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false", "BACKEND_MAX_RESTARTS": "1"})
    with svc.running():
        pid = _pid(svc)
        model.unlink()
        os.kill(pid, signal.SIGKILL)
        backend = wait_for(lambda: (b := _backend(svc))["state"] == "model_unavailable" and b,
                           "the missing model to be reported", within=10)
        assert backend["last_error"] == f"model file not found: {model}", backend
        assert svc.ping() == 503
        assert svc.health()["reason"] == "backend's model file unavailable (see last_error)"
        shutil.copy(tiny_model, model)
        back = time.monotonic()
        svc.wait_ready(timeout=15)  # far below the circuit's 60 s
        assert time.monotonic() - back < 15
        assert _pid(svc) != pid and _backend(svc)["last_error"] is None
    log = svc.log()
    assert f"model file not found: {model}: the backend starts again once it is back" in log


def test_the_derived_prompt_cache_bound_reaches_llama_server(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false"})
    with svc.running():
        argv = Path(f"/proc/{_pid(svc)}/cmdline").read_bytes().decode().split("\0")
    mib = int(argv[argv.index("--cache-ram") + 1])
    assert 0 <= mib <= 8192
    assert f"llama-server prompt cache: at most {mib} MiB" in svc.log()


class RealBackend:
    """A Supervisor of the real llama-server with the tiny model, and what it reported."""

    def __init__(self, folder: Path, model: Path, policy: RestartPolicy) -> None:
        key = folder / "backend.key"
        key.write_text("k\n")
        spec = ServerSpec(binary=llama_server(), model_path=model, alias="tiny",
                          port=free_port(), api_key_file=key, threads=1)
        self.seen: list[Snapshot] = []
        self.supervisor = Supervisor(spec, policy=policy, start_timeout=60, stop_grace=5,
                                     on_change=self.seen.append)

    async def crash(self) -> Snapshot:
        """SIGKILL llama-server; the snapshot that answered the crash."""
        pid = self.supervisor.pid
        assert pid is not None and self.supervisor.snapshot.state == BackendState.READY
        before = len(self.seen)
        os.kill(pid, signal.SIGKILL)
        return await wait_until(
            lambda: next((s for s in self.seen[before:] if s.pid is None), None),
            "the supervisor to see the crash", within=10)

    async def ready(self) -> None:
        await wait_until(lambda: self.supervisor.snapshot.state == BackendState.READY,
                         "llama-server to be ready", within=30)


@contextlib.asynccontextmanager
async def supervised(backend: RealBackend) -> AsyncIterator[None]:
    await backend.supervisor.start()
    task = asyncio.create_task(backend.supervisor.watch())
    try:
        yield
    finally:
        await backend.supervisor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_breaker_counts_afresh_after_its_probe_succeeded(
        tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = RestartPolicy(max_failures=2, window=300, base_delay=0.0, open_seconds=0.2)
    backend = RealBackend(tmp_path, tiny_model, policy)
    caplog.set_level(logging.WARNING, "llamagate.backend")
    async with supervised(backend):
        assert (await backend.crash()).state == BackendState.RESTARTING
        await backend.ready()
        assert (await backend.crash()).state == BackendState.CIRCUIT_OPEN  # 2 in the window
        opened = [r for r in caplog.records if "circuit breaker open" in r.getMessage()]
        assert [r.levelno for r in opened] == [logging.WARNING]
        await backend.ready()  # the probe start after open_seconds
        # before issue 22 the two crashes still counted: this one re-opened the circuit
        assert (await backend.crash()).state == BackendState.RESTARTING
        await backend.ready()
        assert backend.supervisor.snapshot.restarts == 3
