"""Spawning and signalling the llama-server child: the only module that does so
(`spawn` and `exited` also start and await serve's health and gateway workers).

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
import subprocess
import threading
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


def child_preexec() -> None:
    """preexec_fn of every child (llama-server, serve's health and gateway workers): it dies
    with its parent, and starts with SIGHUP ignored. A SIGHUP to serve's process group (a
    terminal hangup, `tini -g`) must kill nothing, and an ignored signal stays ignored
    across exec: llama-server and health never handle it, and a gateway worker is safe
    until its own handler (a keys reload) is installed."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent()


def spawn(argv: Sequence[str], env: dict[str, str], *, new_session: bool = False,
          piped: bool = False) -> subprocess.Popen[bytes]:
    """Start a child with child_preexec; `piped`: its stdout and stderr in one pipe.

    Through subprocess, not the event loop: uvloop's spawn (libuv) sets every signal back
    to its default in the child after preexec_fn has run, so SIGHUP would not stay ignored.
    """
    out = subprocess.PIPE if piped else None
    return subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT if piped else None,
                            start_new_session=new_session, preexec_fn=child_preexec)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():  # a waiter that gave up cancelled it
        future.set_result(None)


def _wait_then_settle(proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop,
                      ended: asyncio.Future[None]) -> None:
    proc.wait()
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, ended)


async def exited(proc: subprocess.Popen[bytes]) -> int:
    """`proc`'s exit status once it has ended, reaped without blocking the loop: a pidfd
    turns readable when the process ends (Linux 5.3+); elsewhere a thread of its own waits
    (not the loop's executor: a wait lasts as long as the child, and there is one per child)."""
    if proc.returncode is not None:
        return proc.returncode  # reaped already: its pid may be another process's now
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or a seccomp profile
        threading.Thread(target=_wait_then_settle, args=(proc, loop, ended),
                         name=f"wait-{proc.pid}", daemon=True).start()
        await ended
        return proc.wait()
    loop.add_reader(fd, _settle, ended)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()  # a zombie now: returns at once


class ServerProcess:
    def __init__(self, argv: Sequence[str], tail_lines: int = 40,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self._extra_env = env or {}
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe: asyncio.BaseTransport | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
        env.update(self._extra_env)
        self._proc = spawn(self.argv, env, new_session=True, piped=True)
        assert self._proc.stdout is not None
        output = asyncio.StreamReader()
        self._pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(output), self._proc.stdout)
        self._pump = asyncio.create_task(self._pump_output(output), name="llama-server-log")
        log.info("llama-server started", extra={"pid": self._proc.pid})

    async def _pump_output(self, output: asyncio.StreamReader) -> None:
        while True:
            raw = await output.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                log.info(line, extra={"source": "llama-server"})

    async def wait(self) -> int:
        assert self._proc is not None
        code = await exited(self._proc)
        if self._pump is not None:
            # the pipe closes with the process; drain what is left so the tail is complete
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        return code

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the group, then SIGKILL after `grace` seconds."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(exited(self._proc), grace)
            except TimeoutError:
                log.warning("llama-server ignored SIGTERM; killing", extra={"grace_s": grace})
                self._signal_group(signal.SIGKILL)
                await exited(self._proc)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._pipe is not None:
            self._pipe.close()
        return self._proc.returncode
