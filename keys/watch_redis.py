"""The live keyring of a replica whose keys are in Redis (keys/reloader.py's twin).

How a change reaches every replica within a second, and why both ways at once:

* **pub/sub**: every write publishes "<version> <ids>" (keys/store_redis.py). A replica at
  exactly ``version - 1`` reads just those ids (one HMGET, in a script that also returns the
  version, so it knows nothing else slipped in); anything else is a full reload. This is the
  fast path: a change lands in milliseconds.
* **version poll**, every 0.5 s: one GET of the counter; a number other than ours is a full
  reload. Pub/sub is fire-and-forget: a message sent while the subscriber's connection is
  down, or reconnecting, is gone for good, and nothing tells the subscriber. The counter is
  the truth and the messages only make it arrive early; a poll of one small key costs each
  replica two GETs a second.

Keyspace notifications were not used: they need ``notify-keyspace-events``, which managed
Redis often refuses, and they are pub/sub too, with the same losses. A stream read with
XREAD BLOCK would replay what a replica missed, but holds a blocked connection per replica
and needs trimming, for what the counter already gives.

Redis unreachable: the keyring in force stays (never log everyone out), the state change is
logged once, and ``report()`` says so. When Redis answers again (``FleetLink.on_up``, or the
subscription's reconnection) the keys are reloaded in full. A replica that starts while
Redis is down serves the last good copy that every good load leaves on local disk (hashes
only, 0600, written atomically), and says so. A record that does not parse is skipped, named
in the log and in ``report()``; the others load. A Redis that comes back without the
counter while this replica holds keys from it (restarted without persistence, flushed)
keeps those keys too, reported as an error, until the next write recreates the counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, ResponseError

from fleet.link import FleetDown, FleetLink
from keys.codec import dump_keys
from keys.errors import KeyFileError, KeyFormatError
from keys.keyring import Keyring
from keys.model import ApiKey
from keys.reloader import ReloadResult
from keys.store import read_keys_file, write_keys_file
from keys.store_redis import RedisKeyReader, Snapshot, decode, decode_all, ordered, parse_announcement

POLL_INTERVAL = 0.5  # seconds between looks at the version counter
LISTEN_TICK = 1.0  # seconds a read of the subscription waits before looking again
RESUBSCRIBE_PAUSE = 0.5  # seconds between attempts to subscribe while Redis is away
MAX_IDS = 1000  # a message naming more ids than this is read as a full reload


class RedisKeyWatcher:
    """Holds the current ``Keyring`` of the key set in Redis. The constructor does no I/O:
    ``await start()`` before serving, ``await close()`` at shutdown."""

    def __init__(self, link: FleetLink, last_good: Path, logger: logging.Logger | None = None, *,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self._link = link
        self._last_good = last_good
        self._log = logger or logging.getLogger("llamagate.keys")
        self._poll_interval = poll_interval
        self._reader = RedisKeyReader(link)
        self._keys: dict[str, ApiKey] = {}
        self._keyring = Keyring()
        self._bad: dict[str, str] = {}  # id -> why its record was skipped
        self._version: int | None = None  # of the keys in force; None: none read from Redis
        self._from_redis_data = False  # the keys in force came from a Redis that had a counter
        self._error: str | None = None
        self._using: str | None = None
        self._reachable = True  # as last logged
        self._stale = False  # Redis was away: the next look is a full reload
        self._copy: bytes | None = None  # what the last good copy on disk holds
        self._lock = asyncio.Lock()  # one reload or apply at a time
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def keyring(self) -> Keyring:
        """The current snapshot; read it once per request."""
        return self._keyring

    def report(self) -> dict[str, object]:
        """The state for /health: whether the keys loaded, and which keys are in force."""
        error = self._error or skipped(self._bad)
        return {"ok": error is None, "keys": len(self._keyring), "error": error,
                "using": self._using, "file_missing": False, "source": "redis",
                "redis": "up" if self._reachable else "unreachable", "version": self._version,
                "skipped": sorted(self._bad)}

    async def start(self) -> None:
        """Load the keys (or, Redis unreachable, the last good copy), then follow changes."""
        self._link.on_up.append(self._on_up)
        # subscribed before the first read: a change between the two is then not missed
        pubsub = await self._subscribe()
        await self.reload()
        self._tasks = [asyncio.create_task(self._listen(pubsub), name="keys-subscribe"),
                       asyncio.create_task(self._poll(), name="keys-poll")]

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._link.on_up.remove(self._on_up)
        # The flag as well as the cancel: after a Redis restart, a close once hung with the
        # listener still inside PubSub.get_message 25 s after its cancel (the cancellation
        # was lost in redis-py); the loops stop at their next turn either way.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=LISTEN_TICK + self._link.timeout * 4 + 1)
        for task in self._tasks:
            if not task.done():
                self._log.error("keys: %s did not stop", task.get_name())
            elif not task.cancelled() and task.exception() is not None:
                self._log.error("keys: %s failed: %r", task.get_name(), task.exception())
        self._tasks = []

    async def reload(self) -> ReloadResult:
        """Read the whole key set now, whether or not it looks changed."""
        async with self._lock:
            return await self._reload()

    # loading ------------------------------------------------------------------------------
    async def _reload(self) -> ReloadResult:
        try:
            snap = await self._reader.read_all()
        except (FleetDown, ResponseError) as exc:
            return self._read_failed(exc)
        if snap.version is None and not snap.records and self._from_redis_data and self._keys:
            return self._failed(
                "the key set in Redis is gone (no version counter: Redis restarted without "
                f"its data, or was flushed); keeping the {len(self._keys)} keys in force")
        good, bad = decode_all(snap.records)
        return await self._install(good, bad, snap)

    async def _install(self, good: dict[str, ApiKey], bad: dict[str, str],
                       snap: Snapshot) -> ReloadResult:
        try:
            keyring = Keyring(good.values())
        except KeyFormatError as exc:  # two records share an id or secret
            return self._failed(f"the key set in Redis is invalid, keeping the last good: {exc}")
        for key_id in sorted(set(bad) - set(self._bad)):
            self._log.error("skipping key %s: its record in Redis is unreadable: %s",
                            key_id, bad[key_id])
        self._keys, self._bad, self._keyring = good, bad, keyring
        self._version, self._from_redis_data = snap.version or 0, snap.version is not None
        self._stale, self._using = False, None
        if not self._reachable:
            self._reachable = True
            self._log.warning("keys: Redis at %s answers again; %d keys loaded",
                              self._link.where, len(keyring))
        elif self._error is not None:
            self._log.warning("keys: the key set in Redis is usable again; %d keys loaded",
                              len(keyring))
        self._error = None
        await self._keep()
        return ReloadResult(ok=not bad, key_count=len(keyring), error=skipped(bad))

    async def _apply(self, version: int, ids: list[str]) -> None:
        """A message: read just its ids when it is the next version, else everything."""
        async with self._lock:
            if self._version is not None and version <= self._version and not self._stale:
                return  # the poll got there first
            if self._version is None or version != self._version + 1 or not ids \
                    or len(ids) > MAX_IDS or self._stale:
                await self._reload()
                return
            try:
                now, records = await self._reader.read_some(ids)
            except (FleetDown, ResponseError) as exc:
                self._read_failed(exc)
                return
            if now != version:  # more changes since the message: read them all
                await self._reload()
                return
            good, bad = dict(self._keys), dict(self._bad)
            for key_id, raw in records.items():
                good.pop(key_id, None)
                bad.pop(key_id, None)
                if raw is not None:
                    try:
                        good[key_id] = decode(key_id, raw)
                    except KeyFormatError as exc:
                        bad[key_id] = str(exc)
            await self._install(good, bad, Snapshot(version, {}))

    def _read_failed(self, exc: FleetDown | ResponseError) -> ReloadResult:
        if isinstance(exc, FleetDown):
            return self._unreachable(exc)
        return self._failed(f"Redis refused to read the key set ({exc}); keeping the "
                            f"{len(self._keyring)} keys in force")

    def _failed(self, error: str) -> ReloadResult:
        if error != self._error:
            self._log.error("keys: %s", error)
        self._error = error
        return ReloadResult(ok=False, key_count=len(self._keyring), error=error)

    def _unreachable(self, exc: BaseException) -> ReloadResult:
        self._stale = True
        error = f"Redis at {self._link.where} is unreachable ({type(exc).__name__})"
        if self._reachable:  # a state change: said once, here or in _fall_back
            if self._version is None:
                return self._fall_back(error)
            self._reachable = False
            self._using = "the last good load, kept in memory"
            self._log.error("keys: %s; keeping the %d keys in force", error, len(self._keyring))
        self._error = error
        return ReloadResult(ok=False, key_count=len(self._keyring), error=error)

    def _fall_back(self, error: str) -> ReloadResult:
        """Redis unreachable and no key set ever read here: the copy on local disk."""
        self._reachable, self._error = False, error
        try:
            keys = read_keys_file(self._last_good)
            saved = self._last_good.stat().st_mtime
        except (FileNotFoundError, KeyFileError, OSError) as exc:
            self._using = None
            self._log.error("keys: %s and no last good copy at %s (%s): no API key will "
                            "authenticate until it answers", error, self._last_good,
                            type(exc).__name__)
            return ReloadResult(ok=False, key_count=0, error=error)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(saved))
        self._keys = {k.id: k for k in keys}
        self._keyring = Keyring(keys)
        self._from_redis_data = bool(keys)  # it came from a Redis that held keys
        self._using = f"last good copy from {when}"
        self._log.warning("keys: %s; serving the %d keys of the last good copy saved %s",
                          error, len(keys), when)
        return ReloadResult(ok=False, key_count=len(keys), error=error)

    async def _keep(self) -> None:
        """Rewrite the last good copy when the keys differ from it; a failure is logged, and
        the keys stay in force."""
        keys = ordered(self._keys.values())
        data = dump_keys(keys).encode()
        if data == self._copy:
            return
        try:
            await asyncio.to_thread(write_keys_file, self._last_good, keys)
        except (KeyFileError, KeyFormatError) as exc:
            self._log.warning("cannot keep a last good copy of the keys at %s: %s",
                              self._last_good, exc)
            return
        self._copy = data

    # following changes --------------------------------------------------------------------
    def _on_up(self) -> None:
        self._stale = True
        self._wake.set()

    async def _poll(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            if not self._link.up:
                self._unreachable(FleetDown("down"))
                continue
            if self._stale:
                await self.reload()
                continue
            try:
                version = await self._reader.version()
            except (FleetDown, ResponseError) as exc:
                self._read_failed(exc)
                continue
            if (version or 0) != (self._version or 0) or self._error is not None:
                await self.reload()

    async def _subscribe(self) -> PubSub | None:
        """The channel subscribed, or None when Redis does not answer."""
        pubsub = self._link.client.pubsub()
        try:
            async with asyncio.timeout(self._link.timeout * 4):
                await pubsub.subscribe(self._reader.names.channel)
        except (RedisError, OSError, TimeoutError):
            await self._unsubscribe(pubsub)
            return None
        return pubsub

    async def _unsubscribe(self, pubsub: PubSub) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await pubsub.aclose()

    async def _listen(self, pubsub: PubSub | None) -> None:
        while not self._closing:
            if pubsub is None:
                await asyncio.sleep(RESUBSCRIBE_PAUSE)
                pubsub = await self._subscribe()
                if pubsub is None:
                    continue
                self._stale = True  # what was published while unsubscribed is lost
                await self.reload()
            try:
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=LISTEN_TICK)
                    if message is None or message.get("type") != "message":
                        continue
                    parsed = parse_announcement(message["data"])
                    if parsed is not None:
                        await self._apply(*parsed)
            except (RedisError, OSError, TimeoutError) as exc:
                self._stale = True
                self._log.debug("keys subscription lost (%s); subscribing again",
                                type(exc).__name__)
            finally:
                await self._unsubscribe(pubsub)
            pubsub = None


def skipped(bad: dict[str, str]) -> str | None:
    """The records left out of a load, for reports; None when there are none."""
    return "skipped unreadable key record(s): " + "; ".join(bad.values()) if bad else None
