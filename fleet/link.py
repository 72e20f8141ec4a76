"""One replica's link to the fleet's Redis: the client, whether Redis answers, and the
names of the keys every other module of the fleet writes.

Every script call goes through ``run`` (or ``run_soon`` and ``run_all``, which do not
wait) onto one connection of the link's own (fleet/wire.py): written at once while none
is out, else with the next batch, so requests that arrive together share a round trip. A
call that fails to reach Redis, or takes longer than REDIS_TIMEOUT, raises ``FleetDown``
and marks Redis down; while it is down, callers are told at once (``up`` is False)
instead of each waiting out a timeout, and a probe tries Redis twice a second until it
answers. Scripts are loaded once (and again after Redis restarts empty) and called by
their SHA, packed here (redis-py's general encoder cost more than the round trip).

Key names: everything of one API key carries it as a hash tag (``llamagate:{id}:...``),
so a script touches one hash slot and Redis Cluster can run it; fleet-wide records
(the key set, the audit stream, the replica list) have tags of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from fleet.wire import FleetDown as FleetDown  # the name callers catch, where they call
from fleet.wire import Wire

log = logging.getLogger("llamagate.fleet")

PROBE_INTERVAL = 0.5  # seconds between attempts while Redis is down
HEARTBEAT_INTERVAL = 5.0  # seconds between a replica's announcements of itself
REPLICA_TTL = 15.0  # a replica not heard of for this long is not counted in the fleet
BULK_TIMEOUTS = 20  # REDIS_TIMEOUTs a run_bulk batch may take (reports, key set reads), 5 s at least
HEADS = 16_384  # packed heads of calls remembered (two per API key in use)

# A replica says it is alive; the answer is how many are (the share of a limit each takes
# when Redis goes away, REDIS_FAILURE_MODE=open).
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) * 2000))
return redis.call('ZCARD', KEYS[1])
"""


@dataclass(frozen=True)
class Script:
    """A Lua script known by its SHA-1, as EVALSHA calls it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def _evalsha_head(sha: str, keys: Sequence[str]) -> bytes:
    """EVALSHA, the script and its keys in RESP (packed here: redis-py's general encoder
    cost more than the call), less the leading count of words."""
    return (b"$7\r\nEVALSHA\r\n" + _bulk(sha.encode()) + _bulk(str(len(keys)).encode())
            + b"".join(_bulk(k.encode()) for k in keys))


def _bulk(word: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(word), word)


def _word(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()




def describe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or ''}"


class FleetLink:
    """The Redis client of one process, shared by its limiter, key watcher, usage and audit."""

    def __init__(self, url: str, prefix: str = "llamagate:", timeout: float = 0.5, *,
                 client: aioredis.Redis | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.where = describe(url)
        # no retries: redis-py's default ones made a call to a paused Redis take 5.6 s, not
        # REDIS_TIMEOUT; the probe does the trying again here
        self.client = client or aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0, decode_responses=False, retry=Retry(NoBackoff(), 0))
        self.replica = secrets.token_hex(8)  # this process, as the fleet counts it
        self.up = True  # until a call fails: the first one tells
        self.down_since: float | None = None
        self.fleet_size: int | None = None  # replicas alive at the last heartbeat
        # hooks for the gateway's metrics: Redis's state, and each round trip's seconds
        self.on_state: Callable[[bool], None] | None = None
        self.observe: Callable[[float], None] | None = None
        self.on_up: list[Callable[[], object]] = []  # called when Redis answers again
        self._scripts: dict[str, Script] = {}
        self._heads: dict[tuple[str, ...], bytes] = {}  # packed script and key names
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wire: Wire | None = None  # the calls' connection, while Redis answers
        self._closing = False
        self._first: list[tuple[bytes, asyncio.Future[Any]]] = []  # waiting for a connection
        self._resent: set[asyncio.Future[Any]] = set()  # calls sent again after NOSCRIPT
        self._reload_waiting: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._reloads: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._heartbeat = self.script(HEARTBEAT)

    # names -------------------------------------------------------------------------------
    def of_key(self, key_id: str, what: str) -> str:
        """A record of one API key's: its id is the hash tag, so they share a slot."""
        return f"{self.prefix}{{{key_id}}}:{what}"

    def name(self, tag: str, what: str = "") -> str:
        """A fleet-wide record, tagged ``tag`` (records with one tag share a slot)."""
        return f"{self.prefix}{{{tag}}}" + (f":{what}" if what else "")

    # calls -------------------------------------------------------------------------------
    def script(self, source: str) -> Script:
        s = Script(source)
        self._scripts[s.sha] = s
        return s

    def run_soon(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Send a script call; the future has its answer, ``FleetDown`` or Redis's error."""
        return self.run_all([(script, keys, args)])[0]

    def run_all(self, calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]]
                ) -> list[asyncio.Future[Any]]:
        """Send script calls in one write (or with the next batch, while one is out)."""
        loop = self.loop_now()
        sent = [(self._packed(script, keys, args), loop.create_future())
                for script, keys, args in calls]
        wire = self._wire
        if wire is None and self.up:  # not connected yet (a link never started: the CLI's)
            self._first.extend(sent)
            if len(self._first) == len(sent):
                task = loop.create_task(self._connect_first())
                self._reloads.add(task)
                task.add_done_callback(self._reloads.discard)
        elif not self.up or wire is None or wire.closed:
            for _, done in sent:
                done.set_exception(FleetDown(f"Redis at {self.where} is unreachable"))
        else:
            wire.send_all(sent)
        return [done for _, done in sent]

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.run_soon(script, keys, args)

    async def run_bulk(self, calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]],
                       within: float | None = None) -> list[Any]:
        """Script calls that read or write much (an admin's usage report, the whole key set,
        a migration), on a connection of the client's pool with a deadline of their own:
        never on the request path's connection, where they would hold admissions up and a
        slow one would count as Redis down. Raises FleetDown; Redis's state is left to the
        calls on the request path (but a Redis known to be down is not waited for)."""
        if not self.up:
            raise FleetDown(f"Redis at {self.where} is unreachable")
        try:
            async with asyncio.timeout(within or max(self.timeout * BULK_TIMEOUTS, 5.0)):
                pipe = self.client.pipeline(transaction=False)
                for script, keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                results: list[Any] = await pipe.execute(raise_on_error=False)
                if any(isinstance(r, NoScriptError) for r in results):
                    await self._load_scripts()
                    pipe = self.client.pipeline(transaction=False)
                    for script, keys, args in calls:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            raise FleetDown(str(exc) or type(exc).__name__) from None
        for result in results:
            if isinstance(result, ResponseError):
                raise result
        return results

    def loop_now(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once: each lookup cost a getpid() system call on
        Python 3.11, several per request."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _packed(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        """The call in RESP; the part before its arguments (script and key names, the same
        for every call of one script on one API key) is packed once."""
        head_of = (script.sha, *keys)
        head = self._heads.get(head_of)
        if head is None:
            if len(self._heads) >= HEADS:
                self._heads.clear()
            head = self._heads[head_of] = _evalsha_head(script.sha, keys)
        return (b"*%d\r\n" % (len(keys) + len(args) + 3) + head
                + b"".join(_bulk(_word(a)) for a in args))

    async def _connect(self) -> None:
        """A new connection for the calls, opened by redis-py (TLS, AUTH, SELECT as the URL
        says) and taken over by a Wire."""
        if self._wire is not None:
            self._wire.close()
        pool = self.client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        async with asyncio.timeout(self.timeout * 4):
            self._wire = await Wire.open(connection, self.timeout, self._lost, self._observed,
                                         self._noscript)

    async def _connect_first(self) -> None:
        try:
            await self._connect()
        except (RedisError, OSError, TimeoutError, RuntimeError) as exc:
            self.failed(exc)
        first, self._first = self._first, []
        wire = self._wire
        if wire is not None and not wire.closed:
            wire.send_all(first)
            return
        for _, done in first:
            done.set_exception(FleetDown(f"Redis at {self.where} is unreachable"))

    def _lost(self, exc: BaseException) -> None:
        if not self._closing:
            self.failed(exc)

    def _noscript(self, packed: bytes, done: asyncio.Future[Any], error: NoScriptError) -> None:
        """Redis does not know a call's script (registered after the link started, or lost
        to SCRIPT FLUSH): one load of the scripts for every such call, then each is sent
        once more."""
        if done in self._resent:
            done.set_exception(error)
            return
        self._resent.add(done)
        done.add_done_callback(self._resent.discard)
        self._reload_waiting.append((packed, done))
        if len(self._reload_waiting) == 1:
            task = self.loop_now().create_task(self._reload_and_resend())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def _reload_and_resend(self) -> None:
        try:
            await self._load_scripts(self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
        waiting, self._reload_waiting = self._reload_waiting, []
        wire = self._wire
        if self.up and wire is not None and not wire.closed:
            wire.send_all([(packed, done) for packed, done in waiting if not done.done()])
            return
        for _, done in waiting:
            if not done.done():
                done.set_exception(FleetDown(f"Redis at {self.where} is unreachable"))

    def _observed(self, seconds: float) -> None:
        if self.observe is not None:
            self.observe(seconds)

    async def _load_scripts(self, within: float | None = None) -> None:
        async with asyncio.timeout(within or self.timeout * 4):
            pipe = self.client.pipeline(transaction=False)
            for s in self._scripts.values():
                pipe.script_load(s.source)
            await pipe.execute()

    async def command(self, *args: Any) -> Any:
        """One plain command (reads off the request path), with the same timeout and state."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                result = await self.client.execute_command(*args)  # type: ignore[no-untyped-call]
        except ResponseError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
            raise FleetDown(str(exc) or type(exc).__name__) from None
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        return result

    # state -------------------------------------------------------------------------------
    def report(self) -> dict[str, object]:
        """The state for /health: whether Redis answers, since when not, the fleet's size."""
        down = None if self.down_since is None else round(time.monotonic() - self.down_since, 1)
        return {"ok": self.up, "redis": self.where, "down_seconds": down,
                "replicas": self.fleet_size}

    def failed(self, exc: BaseException) -> None:
        """A call did not reach Redis: it is down until the probe hears from it."""
        if not self.up:
            return
        self.up = False
        self.down_since = time.monotonic()
        log.error("Redis at %s is unreachable (%s): %s", self.where, type(exc).__name__, exc)
        if self.on_state is not None:
            self.on_state(False)

    def _recovered(self) -> None:
        down = time.monotonic() - (self.down_since or time.monotonic())
        self.up, self.down_since = True, None
        log.warning("Redis at %s answers again after %.1fs", self.where, down)
        if self.on_state is not None:
            self.on_state(True)
        for hook in self.on_up:
            hook()

    async def start(self) -> None:
        """Reach Redis once (a failure is not fatal: the probe goes on trying), then keep
        probing while it is down and announcing this replica while it is up."""
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.client.ping()
            await self._load_scripts()
            await self._connect()
            await self._announce()
        except (RedisError, OSError, TimeoutError, FleetDown) as exc:
            self.failed(exc)
        else:
            log.info("fleet state in Redis at %s (prefix %r), %s replicas", self.where,
                     self.prefix, self.fleet_size)
            if self.on_state is not None:
                self.on_state(True)
        self._task = asyncio.create_task(self._watch(), name="fleet-link")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._wire is not None:
            await self._wire.drained(self.timeout * 2)
            self._wire.close()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    async def _watch(self) -> None:
        beat = 0.0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            if not self.up:
                try:
                    async with asyncio.timeout(self.timeout):
                        await self.client.ping()
                    await self._load_scripts()
                    if self._wire is None or self._wire.closed:
                        await self._connect()
                    await self._writable()
                except (RedisError, OSError, TimeoutError, RuntimeError, FleetDown):
                    continue
                self._recovered()
                beat = 0.0
            beat -= PROBE_INTERVAL
            if beat <= 0:
                beat = HEARTBEAT_INTERVAL
                with contextlib.suppress(FleetDown, ResponseError):
                    await self._announce()

    async def _writable(self) -> None:
        """The heartbeat, sent while Redis still counts as down: a Redis that answers PING
        but refuses writes (a demoted primary: READONLY; full: OOM) is not back."""
        wire = self._wire
        assert wire is not None
        done: asyncio.Future[Any] = self.loop_now().create_future()
        wire.send_all([(self._packed(self._heartbeat, [self.name("fleet", "replicas")],
                                     [self.replica, REPLICA_TTL]), done)])
        self.fleet_size = int(await done)

    async def _announce(self) -> None:
        size = await self.run(self._heartbeat, [self.name("fleet", "replicas")],
                              [self.replica, REPLICA_TTL])
        self.fleet_size = int(size)
