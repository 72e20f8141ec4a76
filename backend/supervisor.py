"""Keeps one llama-server alive: start, wait for ready, restart on crash, stop.

States: stopped → starting → ready → (restarting → starting → ready)* →
stopping → stopped; `circuit_open` when it crash-loops (see restarts.py);
`unresponsive` while a running llama-server leaves /health unanswered (see
liveness.py: back to `ready` when it answers, killed and restarted when it stays
silent); `model_unavailable` while a restart waits for its model file to come back
(see model_file.py). Every change is reported through `on_change` so the health tier
can see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

import aiohttp

from backend.argv import ServerSpec, build_argv, build_env
from backend.liveness import LivenessSettings, Silence, Verdict, answers, probe_session
from backend.model_file import model_problem
from backend.process import ServerProcess
from backend.restarts import RestartPolicy

log = logging.getLogger("llamagate.backend")

# how often a restart waiting on a missing or unreadable model looks for it again
MODEL_POLL: Final = 1.0


class BackendState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    CIRCUIT_OPEN = "circuit_open"
    UNRESPONSIVE = "unresponsive"
    MODEL_UNAVAILABLE = "model_unavailable"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Snapshot:
    state: BackendState = BackendState.STOPPED
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    since: float = 0.0
    retry_at: float | None = None  # wall time of the next start attempt, while restarting
    load_seconds: float | None = None  # the last start's time to ready: the model's cold start


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
        liveness: LivenessSettings | None = None,
        on_change: Callable[[Snapshot], None] = lambda s: None,
    ) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.policy = policy or RestartPolicy()
        self.liveness = liveness or LivenessSettings()
        self.on_change = on_change
        self.snapshot = Snapshot(since=time.time())
        self._proc: ServerProcess | None = None
        self._stopping = False
        self._killed_for: str | None = None  # why the supervisor itself killed llama-server

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
        problem = await asyncio.to_thread(self._model_problem)
        if problem is not None:
            raise StartupError(problem, [])
        await self._launch()

    def _model_problem(self) -> str | None:
        if self.spec.models_preset is not None:  # router mode: our own preset, its models load later
            exists = self.spec.models_preset.is_file()
            return None if exists else f"models preset not found: {self.spec.models_preset}"
        if self.spec.model_path is None:
            return "no model file given"
        return model_problem(self.spec.model_path)

    async def _launch(self) -> None:
        # a router interleaves its children's logs: keep enough to find a failed load's cause
        self._proc = ServerProcess(build_argv(self.spec), env=build_env(self.spec),
                                   tail_lines=400 if self.spec.router else 40)
        self._set(BackendState.STARTING, pid=None)
        began = time.monotonic()
        await self._proc.start()
        self.snapshot = replace(self.snapshot, pid=self._proc.pid)
        await self._wait_ready(self._proc)
        self._set(BackendState.READY, last_error=None,
                  load_seconds=round(time.monotonic() - began, 3))

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
        """Restart llama-server whenever it exits without being asked to, or stops answering."""
        while not self._stopping:
            assert self._proc is not None
            code = await self._until_exit(self._proc)
            if self._stopping:
                return
            reason = self._killed_for or f"llama-server exited unexpectedly with code {code}"
            self._killed_for = None
            log.error(reason, extra={"tail": list(self._proc.tail)[-5:]})
            if not await self._restart(reason):
                return

    async def _restart(self, reason: str) -> bool:
        """Start again until a start reaches ready; False when stopping first."""
        while True:
            now = time.monotonic()
            delay = self.policy.record_failure(now)
            if self.policy.is_open:
                log.warning("backend circuit breaker open: %d crashes within %gs "
                            "(BACKEND_MAX_RESTARTS, BACKEND_RESTART_WINDOW); next start in %gs",
                            self.policy.recent_failures(now), self.policy.window, delay,
                            extra={"last_error": reason})
            state = BackendState.CIRCUIT_OPEN if self.policy.is_open else BackendState.RESTARTING
            self._set(state, pid=None, last_error=reason, retry_at=time.time() + delay)
            if not await self._wait_to_start(delay):
                return False
            self.snapshot = replace(self.snapshot, restarts=self.snapshot.restarts + 1)
            try:
                await self._launch()
            except StartupError as exc:
                log.error("backend restart failed: %s", exc.reason)
                reason = exc.reason
                continue
            self.policy.record_success()
            return True

    async def _wait_to_start(self, delay: float) -> bool:
        """The backoff before a restart, watching the model file meanwhile. A missing or
        unreadable model is named in last_error (llama-server would only say it exited
        with code 1) and waited for instead of started; its return starts llama-server at
        once, the circuit's wait or not: nothing else was wrong. False: stopping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        waited_on: str | None = None
        while not self._stopping:
            problem = await asyncio.to_thread(self._model_problem)
            if problem is not None and problem != waited_on:
                log.error("%s: the backend starts again once it is back", problem)
                self._set(BackendState.MODEL_UNAVAILABLE, pid=None, last_error=problem)
            if problem is None and (waited_on is not None or loop.time() >= deadline):
                return True
            waited_on = problem
            pause = MODEL_POLL if problem else min(MODEL_POLL, deadline - loop.time())
            await asyncio.sleep(pause)  # poll period of the model file
        return False

    async def _until_exit(self, proc: ServerProcess) -> int:
        """`proc`'s exit status, its liveness probed until then."""
        probe = asyncio.create_task(self._probe(proc), name="llama-server-liveness")
        try:
            return await proc.wait()
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _probe(self, proc: ServerProcess) -> None:
        """Probe /health every second; mark llama-server unresponsive when it stays silent
        for BACKEND_HANG_SECONDS, ready again when it answers, and kill it (the watch
        restarts it) when it stays silent for BACKEND_HANG_RESTART_SECONDS."""
        loop = asyncio.get_running_loop()
        silence = Silence(self.liveness, loop.time())
        async with probe_session() as session:
            while True:
                started = loop.time()
                if await answers(session, self.url, silence.probe_time(started)):
                    silence.answered(loop.time())
                now = loop.time()
                self._judge(proc, silence.verdict(now), silence.silent_for(now))
                await asyncio.sleep(self.liveness.period - (loop.time() - started))

    def _judge(self, proc: ServerProcess, verdict: Verdict, silent: float) -> None:
        state = self.snapshot.state
        if self._stopping or state not in (BackendState.READY, BackendState.UNRESPONSIVE):
            return
        if verdict is Verdict.ALIVE and state is BackendState.UNRESPONSIVE:
            log.warning("llama-server answers again")
            self._set(BackendState.READY, last_error=None)
        elif verdict is Verdict.HUNG and state is BackendState.READY:
            reason = f"llama-server has not answered /health for {silent:.1f}s"
            log.warning("%s: refusing requests until it does (BACKEND_HANG_SECONDS)", reason)
            self._set(BackendState.UNRESPONSIVE, last_error=reason)
        elif verdict is Verdict.RESTART and self._killed_for is None:
            self._killed_for = (f"llama-server did not answer /health for {silent:.0f}s "
                                "(BACKEND_HANG_RESTART_SECONDS): killed to restart it")
            proc.kill()

    async def stop(self) -> None:
        self._stopping = True
        if self._proc is None:
            return
        self._set(BackendState.STOPPING)
        await self._proc.stop(self.stop_grace)
        self._set(BackendState.STOPPED, pid=None)
