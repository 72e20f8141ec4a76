"""Child processes of the serve process (health, gateway workers): start,
restart after a crash, stop with SIGTERM then SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from backend.process import die_with_parent

log = logging.getLogger("llamagate.serve")


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], restart: bool = False,
                 on_crash: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.restart = restart
        # called with the dead child's pid: what it held must be given back before its restart
        self.on_crash = on_crash
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    async def start(self) -> None:
        # stdout/stderr are inherited: children log JSON lines to the same stream
        self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env,
                                                         stdin=asyncio.subprocess.DEVNULL,
                                                         preexec_fn=die_with_parent)
        log.info("started %s", self.name, extra={"child_pid": self.proc.pid})

    async def watch(self) -> None:
        """Restart the child when it dies unexpectedly, with a capped backoff."""
        delay = 0.5
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping or not self.restart:
                return
            log.error("%s exited unexpectedly (code %s); restarting in %.1fs", self.name, code, delay)
            if self.on_crash is not None:
                try:
                    self.on_crash(self.proc.pid)
                except Exception:  # the restart matters more than what was left behind
                    log.exception("cleaning up after %s failed", self.name)
            await asyncio.sleep(delay)  # backoff, not synchronisation
            delay = min(delay * 2, 15.0)
            if self._stopping:
                return
            await self.start()

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing", self.name, grace)
            self.signal(signal.SIGKILL)
            await self.proc.wait()
