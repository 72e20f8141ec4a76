"""Issue 21, bug 2: memory an unauthenticated client can hold in the gateway. Each
connection that sent a 9 MiB body used to keep ~9.3 MB in the worker, answered 401 or not:
the connection and its parser referred to each other, so only the cycle collector (whose
threshold gateway/worker.py raises to 10,000) could free them, bodies and all. Now a refused
head's body is never read, and a closed connection lets go of its parser and buffers."""

from __future__ import annotations

import gc
import select
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.edge.connection import HttpConnection
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import serve_gateway
from tests.support.keytool import KeyTool
from tests.support.rawhttp import Client
from tests.support.service import Service
from tests.support.wait import wait_for, wait_until

BODY = 9 * 1024 * 1024
CONNECTIONS = 500
AT_ONCE = 8
PIECE = 256 * 1024


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
        fake: FakeLlama, no_cycle_collector: None) -> None:
    async with serve_gateway(fake.url, {}) as gw:
        client = await Client.sending(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                                      b"Content-Length: 1000000\r\n\r\n" + b"x" * 500_000)
        conn = await wait_until(lambda: next(iter(gw.served.edge.connections), None),
                                "the connection")
        # held by its id only (a compiled connection takes no weak reference): once no object
        # of its class with that id is left, refcounting alone freed it
        conn_id, kind = id(conn), type(conn)
        await wait_until(_receiving(conn), "the body to be partly in")
        del conn
        await client.close()

        def freed() -> bool:
            return not any(id(o) == conn_id for o in gc.get_objects() if type(o) is kind)

        await wait_until(freed, "the connection to be freed by refcounting")


def _receiving(conn: HttpConnection) -> Callable[[], bool]:
    return lambda: conn.receiving


def worker_pid(svc: Service) -> int | None:
    assert svc.proc is not None
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            cmdline = (status.parent / "cmdline").read_bytes()
        except (OSError, StopIteration):
            continue
        if int(ppid.split()[1]) == svc.proc.pid and b"gateway.worker" in cmdline:
            return int(status.parent.name)
    return None


def rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def send_without_key(port: int) -> int:
    """A chat completion's head and up to 9 MiB of body, without a key, on a connection of
    its own; stops sending once an answer arrives. Returns the answer's status."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BODY}\r\n\r\n").encode()
    piece = b"x" * PIECE
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        sent, answer = 0, b""
        deadline = time.monotonic() + 60
        while b"\r\n" not in answer and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < BODY else [], [], 1)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    break
                if not data:
                    break
                answer += data
            elif writable:
                try:
                    sent += sock.send(piece[:BODY - sent])
                except BlockingIOError:
                    continue
                except ConnectionError:
                    break
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@pytest.mark.llama_server
def test_large_bodies_without_a_key_leave_the_worker_s_memory_as_it_was(
        tmp_path: Path, tiny_model: Path) -> None:
    keys = KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")
    keys.generate("app")
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys.keys_file),
                             "USAGE_DB": str(keys.usage_db), "GATEWAY_WORKERS": "1",
                             "AUTH_FAILURES_PER_MINUTE": "1000000"})
    with svc.running():
        pid = wait_for(lambda: worker_pid(svc), "the gateway worker")
        start = rss_mb(pid)
        bound = 2 * start + 50
        with ThreadPoolExecutor(AT_ONCE) as pool:
            statuses = list(pool.map(send_without_key, [svc.port] * CONNECTIONS))
        assert set(statuses) == {401}, sorted(set(statuses))
        wait_for(lambda: rss_mb(pid) < bound,
                 f"the worker's RSS back under {bound:.0f} MB (it started at {start:.0f} MB)",
                 within=30)
