"""A real redis-server for the keys tests' own fixtures: a free port of 127.0.0.1, a folder
of its own, no snapshots or append-only file (``--save "" --appendonly no``). A test may
pause it (SIGSTOP), resume it, kill it, and start it again on the same port and folder: an
explicit SAVE before the kill is what the new one then loads, and without one it starts
empty, as a Redis without persistence does.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.support.service import free_port
from tests.support.wait import wait_for

BINARY = "/usr/bin/redis-server"
STOP_GRACE = 5.0  # seconds a terminated server has to exit before SIGKILL


class LocalRedis:
    """One redis-server process on a port and folder that survive a restart."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A fresh client; the caller closes it."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> LocalRedis:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [BINARY, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._answers, f"redis-server on port {self.port} to answer PING")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, \
            f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}"
        with contextlib.closing(self.client()) as c:
            try:
                return bool(c.ping())
            except redis.ConnectionError:
                return False

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def save(self) -> None:
        """Write the data where a restart on this folder loads it from."""
        with contextlib.closing(self.client()) as c:
            c.save()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)  # a paused one too
        self.proc.kill()
        self.proc.wait(STOP_GRACE)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_GRACE)


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[LocalRedis]:
    """A started server, stopped after the block."""
    server = LocalRedis(directory).start()
    try:
        yield server
    finally:
        server.stop()
