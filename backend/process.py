"""Spawning and signalling the llama-server child: the only module that does so.

The child runs in its own process group so SIGTERM/SIGKILL reach anything it
forks. Its stdout/stderr are pumped line by line into our structured log (tagged
`llama-server`) and the last lines are kept for startup error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import deque
from collections.abc import Sequence

log = logging.getLogger("llamagate.backend.llama_server")

# llama-server reads these from the environment; a stray one in the operator's
# shell (LLAMA_API_KEY especially) would silently change the backend we build.
_SCRUBBED_PREFIXES = ("LLAMA_ARG_", "LLAMA_API_KEY")


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when its parent dies, so a
    SIGKILLed serve process never leaves an orphan llama-server holding the GPU."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: best effort


class ServerProcess:
    def __init__(self, argv: Sequence[str], tail_lines: int = 40,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self._extra_env = env or {}
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
        env.update(self._extra_env)
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=die_with_parent,
        )
        self._pump = asyncio.create_task(self._pump_output(), name="llama-server-log")
        log.info("llama-server started", extra={"pid": self._proc.pid})

    async def _pump_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            raw = await self._proc.stdout.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                log.info(line, extra={"source": "llama-server"})

    async def wait(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._pump is not None:
            # the pipe closes with the process; drain what is left so the tail is complete
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        return code

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the group, then SIGKILL after `grace` seconds."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                log.warning("llama-server ignored SIGTERM; killing", extra={"grace_s": grace})
                self._signal_group(signal.SIGKILL)
                await self._proc.wait()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        return self._proc.returncode
