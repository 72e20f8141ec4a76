"""One replica's link to the fleet's Redis: the client, whether Redis answers, and the
names of the keys every other module of the fleet writes.

Every call goes through ``run`` (or ``run_soon``, which does not wait): the Lua scripts of
one event-loop turn are sent together in one pipeline, so requests that arrive together
share a round trip and a system call. A call that fails to reach Redis, or takes longer
than REDIS_TIMEOUT, raises ``FleetDown`` and marks Redis down; while it is down, callers
are told at once (``up`` is False) instead of each waiting out a timeout, and a probe
tries Redis twice a second until it answers. Scripts are loaded once (and again after
Redis restarts empty) and called by their SHA: one command per call.

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

log = logging.getLogger("llamagate.fleet")

PROBE_INTERVAL = 0.5  # seconds between attempts while Redis is down
HEARTBEAT_INTERVAL = 5.0  # seconds between a replica's announcements of itself
REPLICA_TTL = 15.0  # a replica not heard of for this long is not counted in the fleet
HEADS = 16_384  # packed heads of calls remembered (two per API key in use)
LATER = 0.005  # seconds a call sent with run_later may wait for a batch to go with

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


class FleetDown(Exception):
    """Redis could not be reached (or did not answer in time): the caller falls back."""


@dataclass(frozen=True)
class Script:
    """A Lua script known by its SHA-1, as EVALSHA calls it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


@dataclass(eq=False)
class _Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Any]
    done: asyncio.Future[Any]


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


def _expire(sender: asyncio.Task[None] | None, expired: list[bool]) -> None:
    expired.append(True)
    if sender is not None:
        sender.cancel()


async def _reply(conn: Any) -> Any:
    """One reply; an error reply is returned (for its own call), not raised."""
    try:
        return await conn.read_response()
    except ResponseError as error:
        return error


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
        self._queue: list[_Call] = []
        self._heads: dict[tuple[str, ...], bytes] = {}  # packed script and key names
        self._later: list[_Call] = []  # calls that go with the next batch (run_later)
        self._later_timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None  # sending the queue, batch by batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None  # the batches' own connection, outside the client's pool
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
        """Queue a script call for the next batch; the future has its answer, ``FleetDown``
        or Redis's error."""
        loop = self._loop_now()
        done: asyncio.Future[Any] = loop.create_future()
        if not self.up:
            done.set_exception(FleetDown(f"Redis at {self.where} is unreachable"))
            return done
        self._queue.append(_Call(script, keys, args, done))
        if self._sender is None:
            self._sender = loop.create_task(self._drain())
        return done

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once: each lookup cost a getpid() system call on
        Python 3.11, several per request."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.run_soon(script, keys, args)

    def run_later(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """``run_soon`` for a call nothing waits on (a settlement): it goes out with the next
        batch, or within LATER seconds, so at low load it shares the next admission's
        round trip instead of taking one of its own."""
        loop = self._loop_now()
        done: asyncio.Future[Any] = loop.create_future()
        if not self.up:
            done.set_exception(FleetDown(f"Redis at {self.where} is unreachable"))
            return done
        self._later.append(_Call(script, keys, args, done))
        if self._later_timer is None:
            self._later_timer = loop.call_later(LATER, self._send_later)
        return done

    def _send_later(self) -> None:
        self._later_timer = None
        if self._later and self._sender is None:
            self._sender = self._loop_now().create_task(self._drain())

    async def _drain(self) -> None:
        """Send what is queued, one batch at a time on one connection: what arrives while a
        batch is out goes in the next (a busy replica's calls share round trips)."""
        try:
            while self._queue or self._later:
                batch, self._queue = self._queue, []
                if self._later:
                    batch, self._later = self._later + batch, []
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Call]) -> None:
        started = time.perf_counter()
        try:
            results = await self._execute(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(FleetDown(str(exc) or type(exc).__name__))
            return
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        for call, result in zip(batch, results, strict=True):
            if call.done.done():
                continue
            if isinstance(result, Exception):
                call.done.set_exception(result)
            else:
                call.done.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        results: list[Any] = []
        sender = self._sender
        for attempt in (1, 2):
            # the deadline as a timer that cancels the sender (asyncio.timeout() looked the
            # loop and the task up again, two getpid() calls a batch on Python 3.11)
            expired: list[bool] = []
            timer = self._loop_now().call_later(self.timeout, _expire, sender, expired)
            try:
                conn = await self._connection()
                await conn.send_packed_command(
                    b"".join(self._packed(c) for c in batch), check_health=False)
                results = [await _reply(conn) for _ in batch]
            except BaseException as exc:
                # a batch cut short leaves replies unread on the connection: never reuse it
                if self._conn is not None:
                    await self._conn.disconnect()
                if expired and isinstance(exc, asyncio.CancelledError) and sender is not None:
                    sender.uncancel()
                    raise TimeoutError(f"no answer within {self.timeout:g}s") from None
                raise
            finally:
                timer.cancel()
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                await self._load_scripts()  # Redis restarted empty (or was flushed)
                continue
            return results
        return results

    def _packed(self, call: _Call) -> bytes:
        """The call in RESP; the part before its arguments (script and key names, the same
        for every call of one script on one API key) is packed once."""
        head_of = (call.script.sha, *call.keys)
        head = self._heads.get(head_of)
        if head is None:
            if len(self._heads) >= HEADS:
                self._heads.clear()
            head = self._heads[head_of] = _evalsha_head(call.script.sha, call.keys)
        args = call.args
        return (b"*%d\r\n" % (len(call.keys) + len(args) + 3) + head
                + b"".join(_bulk(_word(a)) for a in args))

    async def _connection(self) -> Any:
        """The connection the batches go out on (made, or made again after a failure)."""
        if self._conn is None:
            pool = self.client.connection_pool
            # no timeout of its own on each reply: the batch has one (redis-py's cost a timer
            # per reply)
            self._conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        if not self._conn.is_connected:
            await self._conn.connect()
        return self._conn

    async def _load_scripts(self) -> None:
        async with asyncio.timeout(self.timeout * 4):
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=self.timeout * 2)
        with contextlib.suppress(RedisError, OSError):
            if self._conn is not None:
                await self._conn.disconnect()
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
                except (RedisError, OSError, TimeoutError):
                    continue
                self._recovered()
                beat = 0.0
            beat -= PROBE_INTERVAL
            if beat <= 0:
                beat = HEARTBEAT_INTERVAL
                with contextlib.suppress(FleetDown, ResponseError):
                    await self._announce()

    async def _announce(self) -> None:
        size = await self.run(self._heartbeat, [self.name("fleet", "replicas")],
                              [self.replica, REPLICA_TTL])
        self.fleet_size = int(size)
