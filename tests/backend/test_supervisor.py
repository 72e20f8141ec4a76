"""backend/supervisor.py with real child processes: a small Python script stands in for
llama-server (it takes llama-server's command line, answers /health on --port, and does
what the file `mode` in its folder says at each start: serve, exit before ready, never
become ready, ignore SIGTERM). A crash is a SIGKILL from the test. The tests wait on the
snapshots the supervisor reports (on_change), never on time; restart delays come from an
injected RestartPolicy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backend.argv import ServerSpec
from backend.restarts import RestartPolicy
from backend.supervisor import BackendState, Snapshot, StartupError, Supervisor
from tests.support.service import free_port
from tests.support.wait import wait_until

STAND_IN = """\
import http.server, os, signal, sys
from pathlib import Path

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
folder = Path(args[args.index("--stand-in-dir") + 1])
mode = (folder / "mode").read_text().strip() if (folder / "mode").exists() else "serve"
with open(folder / "starts", "a") as starts:
    starts.write(f"{os.getpid()} {mode}\\n")
print(f"stand-in pid {os.getpid()} mode {mode}", flush=True)
if mode == "exit":
    print("error: unknown model architecture: 'notarealarch'", flush=True)
    sys.exit(3)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = 503 if mode == "never-ready" else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


print("server is listening", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


class Backend:
    """A supervisor of the stand-in, and every snapshot it reported."""

    def __init__(self, folder: Path, policy: RestartPolicy | None = None, *,
                 start_timeout: float, stop_grace: float) -> None:
        self.folder = folder
        binary = folder / "llama-server"
        binary.write_text(f"#!{sys.executable}\n{STAND_IN}")
        binary.chmod(0o755)
        model = folder / "tiny.gguf"
        model.write_bytes(b"GGUF")
        self.spec = ServerSpec(binary=binary, model_path=model, alias="tiny", port=free_port(),
                               api_key_file=folder / "backend.key",
                               extra_args=("--stand-in-dir", str(folder)))
        self.seen: list[Snapshot] = []
        self.supervisor = Supervisor(self.spec, policy=policy, on_change=self.seen.append,
                                     start_timeout=start_timeout, stop_grace=stop_grace)

    def set_mode(self, mode: str) -> None:
        (self.folder / "mode").write_text(mode)

    def starts(self) -> list[tuple[int, str]]:
        path = self.folder / "starts"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(int(pid), mode) for pid, mode in (line.split() for line in lines)]

    def states(self) -> list[BackendState]:
        return [s.state for s in self.seen]

    async def reached(self, state: BackendState, after: int = 0) -> Snapshot:
        """The first snapshot in `state` among those reported after the first `after`."""
        def found() -> Snapshot | None:
            return next((s for s in self.seen[after:] if s.state == state), None)
        return await wait_until(found, f"the backend to be {state.value}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[Backend]:
    made = Backend(tmp_path, policy=RestartPolicy(base_delay=0.0, max_delay=0.0),
                   start_timeout=20.0, stop_grace=5.0)
    try:
        yield made
    finally:
        await made.supervisor.stop()


@contextlib.asynccontextmanager
async def watching(supervisor: Supervisor) -> AsyncIterator[asyncio.Task[None]]:
    """`supervisor.watch()` running for the block; stopped and then cancelled after it, as
    serve does."""
    task = asyncio.create_task(supervisor.watch())
    try:
        yield task
    finally:
        await supervisor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_start_passes_starting_to_ready_and_stop_ends_the_process(backend: Backend) -> None:
    await backend.supervisor.start()
    pid = backend.supervisor.pid
    assert pid is not None and alive(pid)
    assert backend.states() == [BackendState.STARTING, BackendState.READY]
    assert backend.supervisor.snapshot.pid == pid
    assert any("server is listening" in line for line in backend.supervisor.log_tail)

    await backend.supervisor.stop()
    assert backend.states()[-2:] == [BackendState.STOPPING, BackendState.STOPPED]
    assert backend.supervisor.snapshot.pid is None
    assert not alive(pid)  # SIGTERM was enough: reaped, not left a zombie


async def test_a_missing_model_fails_before_anything_is_spawned(backend: Backend) -> None:
    assert backend.spec.model_path is not None
    backend.spec.model_path.unlink()
    with pytest.raises(StartupError, match="model file not found"):
        await backend.supervisor.start()
    assert backend.starts() == [] and backend.seen == []


async def test_a_first_start_that_exits_fails_fast_with_the_log_tail(backend: Backend) -> None:
    backend.set_mode("exit")
    with pytest.raises(StartupError) as failed:
        await backend.supervisor.start()
    assert failed.value.reason == "llama-server exited with code 3 before it was ready"
    assert any("notarealarch" in line for line in failed.value.tail)
    assert "notarealarch" in str(failed.value)
    assert len(backend.starts()) == 1  # no retry on the first start: bad config fails fast


async def test_a_backend_never_ready_is_stopped_at_the_start_timeout(tmp_path: Path) -> None:
    made = Backend(tmp_path, start_timeout=0.5, stop_grace=5.0)
    made.set_mode("never-ready")
    with pytest.raises(StartupError, match=r"not ready within 0.5s \(BACKEND_START_TIMEOUT\)"):
        await made.supervisor.start()
    [(pid, _)] = made.starts()
    assert not alive(pid)


async def test_a_crash_is_restarted(backend: Backend) -> None:
    await backend.supervisor.start()
    first = backend.supervisor.pid
    assert first is not None
    async with watching(backend.supervisor):
        before = len(backend.seen)
        os.kill(first, signal.SIGKILL)
        restarting = await backend.reached(BackendState.RESTARTING, before)
        assert restarting.pid is None
        assert restarting.last_error == "llama-server exited unexpectedly with code -9"
        assert restarting.retry_at is not None
        ready = await backend.reached(BackendState.READY, before)
        assert ready.restarts == 1 and ready.last_error is None and ready.retry_at is None
        second = backend.supervisor.pid
        assert second is not None and second != first and alive(second)
        assert backend.states()[before:] == [BackendState.RESTARTING, BackendState.STARTING,
                                             BackendState.READY]
    assert [pid for pid, _ in backend.starts()] == [first, second]
    assert not alive(second)


async def test_backoff_grows_with_each_failed_restart(tmp_path: Path) -> None:
    policy = RestartPolicy(max_failures=10, base_delay=0.01, max_delay=0.04)
    made = Backend(tmp_path, policy=policy, start_timeout=20.0, stop_grace=5.0)
    await made.supervisor.start()
    pid = made.supervisor.pid
    assert pid is not None
    made.set_mode("exit")  # every restart fails until the mode changes
    async with watching(made.supervisor):
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: len(made.starts()) >= 5, "four failed restarts")
        made.set_mode("serve")
        ready = await made.reached(BackendState.READY, after=2)
    delays = [s.retry_at - s.since for s in made.seen
              if s.state == BackendState.RESTARTING and s.retry_at is not None]
    # 0.01, 0.02, 0.04, then the cap; retry_at and since come from the same time.time()
    assert [round(d, 3) for d in delays[:4]] == [0.01, 0.02, 0.04, 0.04]
    assert ready.restarts == len(made.starts()) - 1


async def test_a_crash_loop_opens_the_circuit_and_a_probe_that_succeeds_closes_it(
        tmp_path: Path) -> None:
    policy = RestartPolicy(max_failures=2, window=300.0, base_delay=0.0, open_seconds=0.05)
    made = Backend(tmp_path, policy=policy, start_timeout=20.0, stop_grace=5.0)

    def on_change(snapshot: Snapshot) -> None:
        made.seen.append(snapshot)
        if snapshot.state == BackendState.CIRCUIT_OPEN:
            made.set_mode("serve")  # the cause is fixed while the circuit is open

    made.supervisor.on_change = on_change
    await made.supervisor.start()
    pid = made.supervisor.pid
    assert pid is not None
    made.set_mode("exit")
    async with watching(made.supervisor):
        os.kill(pid, signal.SIGKILL)  # failure 1: a restart, which exits (failure 2)
        opened = await made.reached(BackendState.CIRCUIT_OPEN)
        assert opened.retry_at is not None
        assert round(opened.retry_at - opened.since, 3) == 0.05  # open_seconds, not the backoff
        probe = await made.reached(BackendState.READY, after=made.seen.index(opened))
        assert not policy.is_open  # a start that reached ready closed it
        assert probe.restarts == 2
    assert [mode for _, mode in made.starts()] == ["serve", "exit", "serve"]


async def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    made = Backend(tmp_path, start_timeout=20.0, stop_grace=0.2)
    made.set_mode("ignore-term")
    await made.supervisor.start()
    pid = made.supervisor.pid
    assert pid is not None
    await made.supervisor.stop()
    assert not alive(pid)
    assert "llama-server ignored SIGTERM; killing" in caplog.messages
    assert made.states()[-2:] == [BackendState.STOPPING, BackendState.STOPPED]


async def test_stop_while_waiting_to_restart_starts_nothing_more(tmp_path: Path) -> None:
    policy = RestartPolicy(base_delay=3600.0, max_delay=3600.0)  # a wait the test ends itself
    made = Backend(tmp_path, policy=policy, start_timeout=20.0, stop_grace=5.0)
    await made.supervisor.start()
    pid = made.supervisor.pid
    assert pid is not None
    task = asyncio.create_task(made.supervisor.watch())
    try:
        os.kill(pid, signal.SIGKILL)
        await made.reached(BackendState.RESTARTING)
        await made.supervisor.stop()
        assert made.states()[-2:] == [BackendState.STOPPING, BackendState.STOPPED]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(made.starts()) == 1


async def test_a_restart_waits_for_a_deleted_model_and_starts_once_it_is_back(
        tmp_path: Path) -> None:
    """The circuit opens at the first crash (an hour's wait): the model's return starts the
    backend all the same, and until then last_error names the file."""
    policy = RestartPolicy(max_failures=1, open_seconds=3600.0)
    made = Backend(tmp_path, policy=policy, start_timeout=20.0, stop_grace=5.0)
    model = made.spec.model_path
    assert model is not None
    await made.supervisor.start()
    pid = made.supervisor.pid
    assert pid is not None
    async with watching(made.supervisor):
        model.rename(tmp_path / "elsewhere.gguf")
        os.kill(pid, signal.SIGKILL)
        waiting = await made.reached(BackendState.MODEL_UNAVAILABLE)
        assert waiting.last_error == f"model file not found: {model}" and waiting.pid is None
        assert len(made.starts()) == 1  # nothing started without its model
        (tmp_path / "elsewhere.gguf").rename(model)
        ready = await made.reached(BackendState.READY, after=made.seen.index(waiting))
        assert ready.restarts == 1 and ready.last_error is None
    assert [s.state for s in made.seen[-5:-2]] == [BackendState.MODEL_UNAVAILABLE,
                                                     BackendState.STARTING, BackendState.READY]
