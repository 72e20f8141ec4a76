"""A fleet end to end (issue 23): one real llama-server, a real redis-server, and two or three
`llamagate serve` replicas as separate processes, each on ports and a DATA_DIR of its own
(nothing is shared through files), with REDIS_URL set. Keys are made with the real CLI.

Per-key limits hold for the fleet, not per replica; a SIGKILLed replica's concurrency slots
come back within REDIS_LEASE_SECONDS; a key disabled through the CLI is refused everywhere
within a second; Redis paused and killed under traffic: `open` serves on and the usage
totals afterwards equal what llama-server counted, `closed` answers inference 503 and still
knows the keys; `keys migrate --to-redis` carries a single machine's keys, usage and audit
log over, and again changes nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.support.llama import LlamaServer, running_llama_server
from tests.support.metrics import Samples
from tests.support.redis import RedisServer
from tests.support.service import ROOT, Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

PROMPT = [{"role": "user", "content": "Tell me about the weather"}]
LEASE = 3.0  # REDIS_LEASE_SECONDS of the replicas that test it
LEASE_MARGIN = 1.5  # seconds past the lease for the poll to see the slot free on a busy VM
HOLD_TOKENS = 16_000  # a stream that runs for tens of seconds (the tiny model's 16k context)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LlamaServer]:
    """One llama-server for the module: four slots of 16k tokens (two long streams held
    open leave room for the rest); started with --metrics (build_argv adds it)."""
    with running_llama_server(tmp_path_factory.mktemp("llama"), tiny_model, alias="tiny",
                              parallel=4, ctx=4 * 16_384) as server:
        yield server


class Fleet:
    """The replicas of one test: `llamagate serve` before the shared llama-server, each in
    its own process group (SIGKILL reaches its workers too) and its own DATA_DIR."""

    def __init__(self, tmp: Path, llama: LlamaServer, redis_url: str | None) -> None:
        self.tmp, self.llama, self.redis_url = tmp, llama, redis_url
        self.replicas: list[Service] = []
        # `llamagate keys` as an operator's machine runs it: the fleet's Redis, and a
        # DATA_DIR of its own that no replica reads
        self.cli = {"DATA_DIR": str(tmp / "operator")}
        if redis_url is not None:
            self.cli["REDIS_URL"] = redis_url
        self.secrets: list[str] = []  # API keys made, and Redis's password: never in a log

    def key(self, name: str, *options: str) -> tuple[str, str]:
        """A new key made with the CLI against this fleet's Redis; (id, secret)."""
        key_id, secret = generate(self.cli, name, *options)
        self.secrets.append(secret)
        return key_id, secret

    def add(self, **env: str) -> Service:
        """A replica, not started yet."""
        home = self.tmp / f"replica-{len(self.replicas)}"
        home.mkdir(parents=True)
        settings = {"BACKEND_URL": self.llama.url, "BACKEND_API_KEY": self.llama.key,
                    "GATEWAY_WORKERS": "1", "METRICS_PUBLIC": "true",
                    "USAGE_BUFFER_DIR": str(home / "usage-buffer"), **env}
        if self.redis_url is not None:
            settings["REDIS_URL"] = self.redis_url
        svc = Service(home, settings, own_group=True)
        self.replicas.append(svc)
        return svc

    def start(self, count: int, **env: str) -> list[Service]:
        """``count`` replicas, started together (each takes about a second) and ready."""
        started = [self.add(**env) for _ in range(count)]
        for svc in started:
            svc.start()
        for svc in started:
            svc.wait_ready()
        return started

    def stop(self) -> None:
        for svc in self.replicas:
            if svc.proc is not None:
                svc.stop()

    def assert_no_secret_logged(self) -> None:
        for svc in self.replicas:
            log = svc.log()
            for secret in self.secrets:
                assert secret not in log, f"a secret reached {svc.log_path}"


@pytest.fixture
def fleet(tmp_path: Path, llama: LlamaServer, redis_server: RedisServer) -> Iterator[Fleet]:
    """The test's replicas, stopped after it; then none of its secrets may be in their logs."""
    fleet = Fleet(tmp_path, llama, redis_server.url)
    assert redis_server.password is not None
    fleet.secrets.append(redis_server.password)
    try:
        yield fleet
    finally:
        fleet.stop()
    fleet.assert_no_secret_logged()


# the CLI -------------------------------------------------------------------------------------
def keys_cli(env: Mapping[str, str], *argv: str) -> str:
    """`llamagate keys ARGV` as an operator runs it, with ``env`` added; its stdout."""
    done = subprocess.run([sys.executable, "-m", "llamagate.cli", "keys", *argv], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"llamagate keys {' '.join(argv)}: exit {done.returncode}\n" \
                                 f"{done.stdout}{done.stderr}"
    return done.stdout


def generate(env: Mapping[str, str], name: str, *options: str) -> tuple[str, str]:
    """A new key; (id, secret)."""
    created = json.loads(keys_cli(env, "generate", "--name", name, "--json", *options))
    return created["id"], created["secret"]


def usage_rows(env: Mapping[str, str]) -> list[dict[str, Any]]:
    return sorted(json.loads(keys_cli(env, "usage", "--json")),
                  key=lambda r: (r["key_id"], r["model"], r["hour"]))


def totals(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens)."""
    return (sum(r["requests"] for r in rows), sum(r["prompt_tokens"] for r in rows),
            sum(r["completion_tokens"] for r in rows))


# requests ------------------------------------------------------------------------------------
def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat(svc: Service, secret: str, max_tokens: int = 4) -> requests.Response:
    # cache_prompt off: llama-server's prompt counter leaves out cached tokens, and the test
    # of usage totals compares it with what the clients were told
    return requests.post(f"{svc.url}/v1/chat/completions", headers=bearer(secret), timeout=60,
                         json={"model": "tiny", "messages": PROMPT, "max_tokens": max_tokens,
                               "cache_prompt": False})


def models(svc: Service, secret: str) -> requests.Response:
    return requests.get(f"{svc.url}/v1/models", headers=bearer(secret), timeout=10)


def streamed_usage(svc: Service, secret: str, max_tokens: int = 4) -> tuple[int, int, int]:
    """A stream read to its end: (status, prompt tokens, completion tokens) from its usage
    event (0, 0 when it failed)."""
    body: dict[str, Any] = {"model": "tiny", "messages": PROMPT, "max_tokens": max_tokens,
                            "stream": True, "stream_options": {"include_usage": True},
                            "cache_prompt": False}
    with requests.post(f"{svc.url}/v1/chat/completions", headers=bearer(secret), json=body,
                       stream=True, timeout=60) as r:
        if r.status_code != 200:
            return r.status_code, 0, 0
        usage = None
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None, "the stream ended without its usage event"
    return 200, usage["prompt_tokens"], usage["completion_tokens"]


class HeldStream:
    """A long stream whose client reads its answer's head and then nothing: with a 4 KB
    receive window the gateway's writes stall, so the request holds its slot until the
    client hangs up (``close``) or the replica dies."""

    def __init__(self, svc: Service, secret: str) -> None:
        body = json.dumps({"model": "tiny", "messages": PROMPT, "max_tokens": HOLD_TOKENS,
                           "stream": True}).encode()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        try:
            self.sock.connect(("127.0.0.1", svc.port))
            self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Type: application/json\r\n"
                              + f"Authorization: Bearer {secret}\r\n".encode()
                              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.sock.recv(4096)
                assert chunk, f"the connection closed before an answer: {head!r}"
                head += chunk
        except BaseException:
            self.sock.close()
            raise
        self.head = head
        self.status = int(head.split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()  # unread bytes: the kernel answers the gateway's next write with RST


def admitted(r: requests.Response) -> bool:
    """200, or False for a refusal by the concurrency limit; anything else fails the test."""
    assert r.status_code in (200, 429), (r.status_code, r.text)
    if r.status_code == 429:
        assert int(r.headers["Retry-After"]) >= 1
    return r.status_code == 200


# metrics -------------------------------------------------------------------------------------
def samples(url: str, headers: Mapping[str, str] | None = None) -> Samples:
    r = requests.get(f"{url}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return Samples.parse(r.text)


def gauge(svc: Service, name: str) -> float | None:
    return samples(svc.url).get_value(name)


def llama_counts(llama: LlamaServer) -> tuple[float, float]:
    """llama-server's own (prompt tokens evaluated, tokens predicted), once it is idle."""
    def idle() -> Samples | None:
        s = samples(llama.url, llama.headers)
        busy = s.total("llamacpp:requests_processing") + s.total("llamacpp:requests_deferred")
        return s if busy == 0 else None

    s = wait_for(idle, "llama-server to have no request in hand", within=30)
    return s.total("llamacpp:prompt_tokens_total"), s.total("llamacpp:tokens_predicted_total")


def test_the_redis_server_keeps_what_it_acknowledged_through_sigkill(
        redis_server: RedisServer) -> None:
    """The helper the other tests rely on: a restart after SIGKILL keeps the data (the
    append-only file, fsynced at every write), on the same port and URL."""
    url = redis_server.url
    with redis_server.client() as client:
        client.hset("h", mapping={"a": "1", "b": "2"})
    redis_server.kill()
    redis_server.restart()
    assert redis_server.url == url
    with redis_server.client() as client:
        assert client.hgetall("h") == {"a": "1", "b": "2"}
    redis_server.pause()
    with redis_server.client(timeout=0.2) as client, pytest.raises(redis.exceptions.TimeoutError):
        client.ping()
    redis_server.resume()
    with redis_server.client() as client:
        assert client.ping()


def test_a_keys_requests_per_minute_are_counted_by_the_whole_fleet(fleet: Fleet) -> None:
    _, secret = fleet.key("rpm", "--rpm", "5")
    replicas = fleet.start(3)
    started = time.monotonic()
    answers = [chat(replicas[i % 3], secret) for i in range(12)]
    elapsed = time.monotonic() - started
    # a bucket of 5 a minute gains one request every 12 s: the run must be shorter
    assert elapsed < 60 / 5, f"12 requests took {elapsed:.1f}s: the window refilled"
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 7, [r.text for r in answers]
    assert [r.headers.get("x-ratelimit-remaining-requests") for r in answers[:5]] == \
        ["4", "3", "2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in answers[:5])
    for refused in answers[5:]:
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"


def test_max_concurrent_holds_for_the_whole_fleet(fleet: Fleet) -> None:
    _, secret = fleet.key("conc", "--max-concurrent", "2")
    a, b, c = fleet.start(3)
    held: list[HeldStream] = []
    try:
        held += [HeldStream(a, secret), HeldStream(b, secret)]
        assert [h.status for h in held] == [200, 200], [h.head for h in held]
        assert not admitted(chat(c, secret)), "a third request while two streams run"
        held.pop(0).close()  # one ends: its client hangs up
        wait_for(lambda: admitted(chat(c, secret)), "a request admitted once one stream ended",
                 within=5)
        # two again (b's stream and a new one on c): a's request is refused
        held.append(HeldStream(c, secret))
        assert held[-1].status == 200, held[-1].head
        assert not admitted(chat(a, secret))
    finally:
        for h in held:
            h.close()


def test_a_killed_replica_gives_its_slots_back_within_the_lease(fleet: Fleet) -> None:
    _, secret = fleet.key("lease", "--max-concurrent", "2")
    a, b = fleet.start(2, REDIS_LEASE_SECONDS=f"{LEASE:g}")
    held = [HeldStream(a, secret), HeldStream(a, secret)]
    try:
        assert [h.status for h in held] == [200, 200], [h.head for h in held]
        assert not admitted(chat(b, secret))
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL)  # serve, its gateway worker and health process
        killed = time.monotonic()
        a.proc.wait()
        # its slots were renewed at most a third of a lease ago: refused for a while yet
        assert not admitted(chat(b, secret))
        wait_for(lambda: admitted(chat(b, secret)), "the dead replica's slots to lapse",
                 within=LEASE + 10)
        took = time.monotonic() - killed
        assert took <= LEASE + LEASE_MARGIN, f"admitted {took:.2f}s after the SIGKILL"
    finally:
        for h in held:
            h.close()


def test_a_key_disabled_through_the_cli_is_refused_by_every_replica_within_a_second(
        fleet: Fleet) -> None:
    env = fleet.cli
    key_id, secret = fleet.key("revoked")
    replicas = fleet.start(3)
    assert [models(r, secret).status_code for r in replicas] == [200] * 3
    keys_cli(env, "disable", key_id)
    disabled = time.monotonic()  # the CLI has exited
    refused_after: dict[int, float] = {}

    def everyone_refuses() -> bool:
        for i, svc in enumerate(replicas):
            if i not in refused_after:
                status = models(svc, secret).status_code
                assert status in (200, 401), status
                if status == 401:
                    refused_after[i] = time.monotonic() - disabled
        return len(refused_after) == len(replicas)

    wait_for(everyone_refuses, "every replica to refuse the disabled key", within=10)
    assert max(refused_after.values()) <= 1.0, refused_after


@dataclass
class Served:
    status: int
    prompt: int
    completion: int


class Traffic:
    """Requests sent one after another, round robin over the replicas, half of them
    streamed, until ``stop``; each answer's status and the usage its client was told."""

    def __init__(self, replicas: list[Service], secret: str) -> None:
        self.replicas, self.secret = replicas, secret
        self.served: list[Served] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(1)
        self._run: Future[None] = self._pool.submit(self._loop)

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            svc = self.replicas[n % len(self.replicas)]
            if n % 2:
                self.served.append(Served(*streamed_usage(svc, self.secret)))
            else:
                r = chat(svc, self.secret)
                usage = r.json()["usage"] if r.status_code == 200 else None
                self.served.append(Served(r.status_code, *(
                    (usage["prompt_tokens"], usage["completion_tokens"]) if usage else (0, 0))))
            n += 1

    def more(self, count: int, what: str) -> None:
        """Until ``count`` more answers have come (the loop's failure, if it failed)."""
        target = len(self.served) + count

        def done() -> bool:
            if self._run.done():
                self._run.result()
                raise AssertionError("the traffic stopped")
            return len(self.served) >= target

        wait_for(done, f"{count} more answers {what}", within=60)

    def stop(self) -> list[Served]:
        self._stop.set()
        try:
            self._run.result(timeout=120)
        finally:
            self._pool.shutdown()
        return self.served


def every(replicas: list[Service], name: str, value: float, what: str) -> None:
    wait_for(lambda: all(gauge(svc, name) == value for svc in replicas), what, within=30)


def buffering(replicas: list[Service], when: str) -> None:
    """Until a replica keeps usage on its disk: the outage reached the usage path."""
    wait_for(lambda: sum(gauge(svc, "llamagate_usage_buffered") or 0 for svc in replicas) > 0,
             f"usage buffered {when}", within=15)


def test_open_mode_serves_through_redis_outages_and_loses_and_doubles_no_usage(
        fleet: Fleet, redis_server: RedisServer, llama: LlamaServer) -> None:
    env = fleet.cli
    # a limit that never binds, so that every request asks Redis
    key_id, secret = fleet.key("outage", "--rpm", "100000")
    replicas = fleet.start(3, REDIS_FAILURE_MODE="open", REDIS_TIMEOUT="0.2")
    prompt_before, predicted_before = llama_counts(llama)
    traffic = Traffic(replicas, secret)
    try:
        traffic.more(6, "before the outages")
        redis_server.pause()
        every(replicas, "llamagate_redis_up", 0, "every replica to see Redis paused")
        traffic.more(6, "while Redis is paused")
        buffering(replicas, "while Redis is paused")
        redis_server.resume()
        every(replicas, "llamagate_redis_up", 1, "every replica to see Redis again")
        traffic.more(6, "after the pause")
        redis_server.kill()
        every(replicas, "llamagate_redis_up", 0, "every replica to see Redis gone")
        traffic.more(6, "while Redis is dead")
        buffering(replicas, "while Redis is dead")
        redis_server.restart()
        every(replicas, "llamagate_redis_up", 1, "every replica to see Redis restarted")
        traffic.more(6, "after the restart")
    finally:
        served = traffic.stop()
    assert [s.status for s in served] == [200] * len(served)
    told = (len(served), sum(s.prompt for s in served), sum(s.completion for s in served))

    every(replicas, "llamagate_usage_buffered", 0, "every replica's buffered usage replayed")
    wait_for(lambda: totals(usage_rows(env)) == told, f"the fleet's usage to reach {told}",
             within=15)
    rows = usage_rows(env)
    assert {(r["key_id"], r["model"]) for r in rows} == {(key_id, "tiny")}
    assert totals(rows) == told  # read again: no replay arrived twice
    prompt_after, predicted_after = llama_counts(llama)
    assert (prompt_after - prompt_before, predicted_after - predicted_before) == told[1:]


def test_closed_mode_refuses_inference_while_redis_is_down_and_still_knows_the_keys(
        fleet: Fleet, redis_server: RedisServer) -> None:
    _, secret = fleet.key("closed", "--rpm", "100000")
    replicas = fleet.start(2, REDIS_FAILURE_MODE="closed", REDIS_TIMEOUT="0.2")

    def status_everywhere(want: int) -> bool:
        answers = [chat(svc, secret) for svc in replicas]
        assert all(r.status_code in (200, 503) for r in answers), [r.text for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1, r.headers
        return all(r.status_code == want for r in answers)

    assert status_everywhere(200)
    for outage, back in ((redis_server.pause, redis_server.resume),
                         (redis_server.kill, redis_server.restart)):
        outage()
        wait_for(lambda: status_everywhere(503), f"inference refused after {outage.__name__}",
                 within=10)
        for svc in replicas:  # the last good key set: the key is known, a wrong one is not
            assert models(svc, secret).status_code == 200
            assert models(svc, "lg-not-a-key").status_code == 401
        back()
        wait_for(lambda: status_everywhere(200), f"inference served after {back.__name__}",
                 within=10)


def snapshot(env: Mapping[str, str]) -> dict[str, Any]:
    """What `llamagate keys` shows of a deployment: its keys (less last use), usage rows
    and audit entries (less their ids, which each store numbers its own way)."""
    listed = json.loads(keys_cli(env, "list", "--json"))
    audit = json.loads(keys_cli(env, "audit", "--json", "--limit", "1000"))
    return {"keys": sorted(({k: v for k, v in key.items() if k != "last_used"} for key in listed),
                           key=lambda k: k["id"]),
            "usage": usage_rows(env),
            "audit": [{k: v for k, v in e.items() if k != "id"} for e in audit]}


def test_migrate_to_redis_carries_keys_usage_and_audit_over_once(
        tmp_path: Path, llama: LlamaServer, redis_server: RedisServer, fleet: Fleet) -> None:
    # a single machine: keys.json and usage.db in its DATA_DIR, where its CLI writes them
    single = Fleet(tmp_path / "single", llama, None)
    svc = single.add()
    files = single.cli = {"DATA_DIR": svc.env["DATA_DIR"]}
    _, alpha = single.key("alpha", "--rpm", "100")
    beta_id, beta = single.key("beta")
    keys_cli(files, "disable", beta_id)
    keys_cli(files, "enable", beta_id)
    gone_id, gone = single.key("gone")
    keys_cli(files, "disable", gone_id)
    with svc.running():
        assert [chat(svc, alpha).status_code for _ in range(3)] == [200] * 3
        assert [chat(svc, beta).status_code for _ in range(2)] == [200] * 2
        assert chat(svc, gone).status_code == 401
    single.assert_no_secret_logged()
    wait_for(lambda: totals(usage_rows(files))[0] == 5, "the usage of 5 requests in usage.db",
             within=15)
    before = snapshot(files)
    assert before["audit"], "the single machine's audit log is empty"

    into_redis = {**files, "REDIS_URL": redis_server.url}
    keys_cli(into_redis, "migrate", "--to-redis")
    migrated = snapshot(into_redis)
    assert migrated["keys"] == before["keys"]
    assert migrated["usage"] == before["usage"]
    assert all(entry in migrated["audit"] for entry in before["audit"]), migrated["audit"]

    keys_cli(into_redis, "migrate", "--to-redis")
    assert snapshot(into_redis) == migrated  # again: nothing added, nothing counted twice

    # a replica of the fleet, on a DATA_DIR of its own, knows the keys from Redis
    fleet.secrets += single.secrets
    [replica] = fleet.start(1)
    assert chat(replica, alpha).status_code == 200
    assert chat(replica, beta).status_code == 200
    assert chat(replica, gone).status_code == 401
