"""Keeps one llama-server alive: start, wait for ready, restart on crash, stop.

States: stopped → starting → ready → (restarting → starting → ready)* →
stopping → stopped; `circuit_open` when it crash-loops (see restarts.py).
Every change is reported through `on_change` so the health tier can see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import aiohttp

from backend.argv import ServerSpec, build_argv, build_env
from backend.process import ServerProcess
from backend.restarts import RestartPolicy

log = logging.getLogger("llamagate.backend")


class BackendState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    CIRCUIT_OPEN = "circuit_open"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Snapshot:
    state: BackendState = BackendState.STOPPED
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    since: float = 0.0
    retry_at: float | None = None  # wall time of the next start attempt, while restarting


class StartupError(RuntimeError):
    """llama-server did not become ready; the message carries its last log lines."""

    def __init__(self, reason: str, tail: list[str]) -> None:
        self.reason = reason
        self.tail = tail
        lines = "\n    ".join(tail[-15:]) or "(no output)"
        super().__init__(f"{reason}\n  last lines of llama-server's log:\n    {lines}")


class Supervisor:
    def __init__(
        self,
        spec: ServerSpec,
        *,
        start_timeout: float = 300.0,
        stop_grace: float = 10.0,
        policy: RestartPolicy | None = None,
        on_change: Callable[[Snapshot], None] = lambda s: None,
    ) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.policy = policy or RestartPolicy()
        self.on_change = on_change
        self.snapshot = Snapshot(since=time.time())
        self._proc: ServerProcess | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_tail(self) -> list[str]:
        """The last lines llama-server (and, in router mode, its children) printed."""
        return list(self._proc.tail) if self._proc else []

    def _set(self, state: BackendState, **changes: object) -> None:
        changes.setdefault("retry_at", None)  # known only while waiting to restart
        self.snapshot = replace(self.snapshot, state=state, since=time.time(), **changes)  # type: ignore[arg-type]
        log.info("backend %s", state.value, extra={"backend_pid": self.snapshot.pid})
        self.on_change(self.snapshot)

    async def start(self) -> None:
        """First start: raise StartupError instead of retrying, so bad config fails fast."""
        path = self.spec.models_preset or self.spec.model_path
        if path is None or not path.is_file():
            raise StartupError(f"model file not found: {path}", [])
        await self._launch()

    async def _launch(self) -> None:
        # a router interleaves its children's logs: keep enough to find a failed load's cause
        self._proc = ServerProcess(build_argv(self.spec), env=build_env(self.spec),
                                   tail_lines=400 if self.spec.router else 40)
        self._set(BackendState.STARTING, pid=None)
        await self._proc.start()
        self.snapshot = replace(self.snapshot, pid=self._proc.pid)
        await self._wait_ready(self._proc)
        self._set(BackendState.READY, last_error=None)

    async def _wait_ready(self, proc: ServerProcess) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        exited = asyncio.ensure_future(proc.wait())
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while True:
                    if exited.done():
                        raise StartupError(
                            f"llama-server exited with code {exited.result()} before it was ready",
                            list(proc.tail))
                    if loop.time() > deadline:
                        await proc.stop(self.stop_grace)
                        raise StartupError(
                            f"llama-server was not ready within {self.start_timeout:g}s "
                            "(BACKEND_START_TIMEOUT)", list(proc.tail))
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with session.get(f"{self.url}/health") as resp:
                            if resp.status == 200:
                                return
                    # poll interval while the model loads; returns early if the child exits
                    await asyncio.wait({exited}, timeout=0.05)
        finally:
            if not exited.done():
                exited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exited

    async def watch(self) -> None:
        """Restart llama-server whenever it exits without being asked to."""
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            reason = f"llama-server exited unexpectedly with code {code}"
            log.error(reason, extra={"tail": list(self._proc.tail)[-5:]})
            delay = self.policy.record_failure(time.monotonic())
            state = BackendState.CIRCUIT_OPEN if self.policy.is_open else BackendState.RESTARTING
            self._set(state, pid=None, last_error=reason, retry_at=time.time() + delay)
            await asyncio.sleep(delay)  # backoff between restarts, not synchronisation
            if self._stopping:
                return
            self.snapshot = replace(self.snapshot, restarts=self.snapshot.restarts + 1)
            try:
                await self._launch()
            except StartupError as exc:
                log.error("backend restart failed: %s", exc.reason)
                self.snapshot = replace(self.snapshot, last_error=exc.reason)
                continue
            self.policy.record_success()

    async def stop(self) -> None:
        self._stopping = True
        if self._proc is None:
            return
        self._set(BackendState.STOPPING)
        await self._proc.stop(self.stop_grace)
        self._set(BackendState.STOPPED, pid=None)
