"""Child processes of the serve process (health, gateway workers): start, restart after
any unexpected death, stop with SIGTERM then SIGKILL.

A child starts with SIGHUP ignored (backend.process.spawn): it shares serve's process
group, so a terminal hangup or `tini -g` sends it the SIGHUP meant for serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from backend.process import exited, spawn

log = logging.getLogger("llamagate.serve")

FIRST_DELAY = 0.5  # seconds before the first restart; doubled after each quick death
MAX_DELAY = 15.0
STABLE_RUN = 60.0  # a child that ran this long died of something new: restart it at once


def child_env(runtime_dir: Path, workers: int) -> dict[str, str]:
    """The children's environment: serve's own, less the backend key, plus the Prometheus
    directory that several gateway workers share (created here)."""
    env = dict(os.environ)
    env.pop("BACKEND_API_KEY", None)  # the workers read it from a 0600 file
    env["PYTHONUNBUFFERED"] = "1"
    if workers > 1:
        metrics_dir = runtime_dir / "metrics"
        metrics_dir.mkdir(mode=0o700)  # private as the rest of the runtime directory
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def how_it_ended(code: int) -> dict[str, int | str]:
    """An exit status as log fields: asyncio gives a death by signal N as -N."""
    if code >= 0:
        return {"exit_code": code}
    try:
        return {"signal": signal.Signals(-code).name}
    except ValueError:  # a real-time signal has no name
        return {"signal": str(-code)}


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str],
                 on_crash: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        # called with the dead child's pid: what it held must be given back before its restart
        self.on_crash = on_crash
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._started = 0.0
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # stdout/stderr are inherited: children log JSON lines to the same stream
        self.proc = spawn(self.argv, self.env)
        self._started = time.monotonic()
        log.info("started %s", self.name, extra={"child": self.name, "child_pid": self.proc.pid})

    def supervise(self) -> None:
        """Watch the started child from now until stop(): a task the child owns."""
        self._watch = asyncio.create_task(self.watch(), name=f"watch-{self.name}")

    async def watch(self) -> None:
        """Restart the child whenever it dies without being stopped, with a capped backoff
        for one that keeps dying."""
        delay = FIRST_DELAY
        while True:
            assert self.proc is not None
            code = await exited(self.proc)
            if self._stopping:
                return
            if time.monotonic() - self._started >= STABLE_RUN:
                delay = FIRST_DELAY
            ended = how_it_ended(code)
            log.error("%s exited unexpectedly (%s); restarting in %.1fs", self.name,
                      " ".join(f"{k} {v}" for k, v in ended.items()), delay,
                      extra={"child": self.name, "child_pid": self.proc.pid, **ended})
            if self.on_crash is not None:
                try:
                    self.on_crash(self.proc.pid)
                except Exception:  # the restart matters more than what was left behind
                    log.exception("cleaning up after %s failed", self.name)
            await asyncio.sleep(delay)  # backoff, not synchronisation
            delay = min(delay * 2, MAX_DELAY)
            if self._stopping:
                return
            await self.start()

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._watch is not None:
            # first, so that no restart starts a process after the one stopped below
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(exited(self.proc), grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing", self.name, grace)
            self.signal(signal.SIGKILL)
            await exited(self.proc)
