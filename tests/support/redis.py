"""A real `redis-server` (Debian's package) of the test's own: a free port of 127.0.0.1, a
folder of its own, every write fsynced to its append-only file so that a SIGKILL and a
restart on the same port and folder keep what it had acknowledged (``appendonly=False``: a
Redis without persistence, which restarts empty). A test may pause it (SIGSTOP), resume it,
kill it and start it again, as an outage would (``save`` first, and a server without its
append-only file starts again with what it had then); with ``password`` it demands one, and
its URL carries it, as a managed Redis's does.

Without the binary the test fails: as root with apt-get the package is installed first
(as `.ci/run` does), otherwise the failure says how to get it. Never a skip: the fleet's
tests are the only check that Redis is used as the code says."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.service import free_port
from tests.support.wait import wait_for

DEBIAN_BINARY = Path("/usr/bin/redis-server")
START_WITHIN = 15.0  # seconds for a fresh or restarted server to answer PING


@functools.cache
def redis_server_binary() -> Path:
    """redis-server from PATH (or Debian's place), installed with apt-get when possible."""
    found = shutil.which("redis-server") or (str(DEBIAN_BINARY) if DEBIAN_BINARY.exists() else None)
    if found:
        return Path(found)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install("redis-server")
        found = shutil.which("redis-server")
        if found:
            return Path(found)
    pytest.fail("redis-server is not installed: the fleet tests run a real one. Install Debian's "
                "package (`apt-get install redis-server`) or put redis-server on PATH.")


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode == 0:
        return
    # a fresh image has no package lists yet
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(install)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")


class RedisServer:
    """One redis-server process; ``restart`` keeps its port, folder and data."""

    def __init__(self, tmp: Path, *, appendonly: bool = True, password: str | None = None) -> None:
        self.dir = tmp / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.dir / "redis.log"
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [str(redis_server_binary()),
                "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--daemonize", "no", "--save", "",  # no snapshots: the AOF is the data
                "--logfile", str(self.log_path)]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:  # from a file: a command line is every user's to read
            conf = self.dir / "redis.conf"
            conf.touch(mode=0o600)
            conf.write_text(f"requirepass {self.password}\n")
            argv.insert(1, str(conf))  # the file first, then the options
        return argv

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "redis-server already running"
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._answers, f"redis-server on port {self.port} to answer PING",
                 within=START_WITHIN)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with self.client(timeout=0.5) as client:
                return bool(client.ping())
        except redis.exceptions.BusyLoadingError:
            return False  # replaying its append-only file after a restart
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    def client(self, timeout: float = 5.0, *, decode: bool = True) -> redis.Redis:
        """A synchronous client (strings decoded; bytes with ``decode=False``) that does not
        retry: a call to a paused server fails after ``timeout``. Close it, or use it in a
        `with`."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           decode_responses=decode, socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def save(self) -> None:
        """SAVE: a snapshot in its folder, which a restart loads when there is no append-only
        file (``appendonly=False``) to load instead."""
        with self.client() as client:
            client.save()

    def _signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "redis-server is not running"
        self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung host)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: what it acknowledged is on disk (appendfsync always), unless it was
        started without its append-only file."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> RedisServer:
        """Started again on the same port and folder (after ``kill`` or ``stop``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, should it be paused), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
