"""The fleet's key set in Redis: the only code that writes it (keys/store.py's twin).

Layout, all under one hash tag so that one MULTI (and one Lua script) may touch them together,
on Redis Cluster too:

    <prefix>{keys}            hash: key id -> that key's JSON (codec.key_to_dict; hashes, never
                              a secret)
    <prefix>{keys}:version    counter, +1 at every change
    <prefix>keys              pub/sub channel: "<new version> <changed ids, comma-separated>"

A change is optimistic: WATCH the version and the hash, read, apply the same pure
``change(keys) -> (new_keys, result)`` that ``KeyStore.update`` applies (keys/ops.py), then in
one MULTI write only the changed ids, INCR the version and PUBLISH; a concurrent change makes
EXEC fail and the cycle runs again. The PUBLISH is inside the MULTI (a small script with the
INCR, so the message names the version it made), not after EXEC: messages then go out in
version order, and a writer that dies after EXEC cannot leave a change unannounced (the
watchers' version poll would still catch it, within half a second).

The CLI writes through the synchronous ``RedisKeyStore``; the gateway reads through
``RedisKeyReader`` (async, over the process's ``FleetLink``), which keys/watch_redis.py uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from redis.exceptions import WatchError

from fleet.link import FleetLink
from keys.codec import check_unique, key_from_dict, key_to_dict
from keys.errors import KeyFileError, KeyFormatError
from keys.link_sync import SyncLink
from keys.model import ApiKey

KeySet = tuple[ApiKey, ...]
T = TypeVar("T")
MAX_ATTEMPTS = 50  # WATCH cycles before giving up: only a storm of concurrent writers gets there

# One round trip each, and a consistent view: the version and the records it describes.
READ_ALL = "return {redis.call('GET', KEYS[2]), redis.call('HGETALL', KEYS[1])}"
READ_SOME = "return {redis.call('GET', KEYS[2]), redis.call('HMGET', KEYS[1], unpack(ARGV))}"
BUMP = """
local v = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], v .. ' ' .. ARGV[2])
return v
"""


class Named(Protocol):
    """What names the fleet's records: ``FleetLink`` or the CLI's ``SyncLink``."""

    @property
    def prefix(self) -> str: ...
    def name(self, tag: str, what: str = "") -> str: ...


@dataclass(frozen=True, slots=True)
class KeyNames:
    """The Redis names of the key set."""

    hash: str
    version: str
    channel: str

    @classmethod
    def of(cls, link: Named) -> KeyNames:
        return cls(link.name("keys"), link.name("keys", "version"), f"{link.prefix}keys")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The key set as read at one version (None: the counter does not exist)."""

    version: int | None
    records: dict[str, bytes]


def encode(key: ApiKey) -> bytes:
    """One key's record: the keys file's JSON for it, compact."""
    return json.dumps(key_to_dict(key), sort_keys=True, separators=(",", ":")).encode()


def decode(key_id: str, raw: bytes) -> ApiKey:
    """Parse one record strictly; raises KeyFormatError naming the id, never the content."""
    where = f"key {key_id} in Redis"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFormatError(f"{where}: not valid JSON ({type(exc).__name__})") from None
    key = key_from_dict(doc, where)
    if key.id != key_id:
        raise KeyFormatError(f"{where}: the record says id {key.id!r}")
    return key


def decode_all(records: Mapping[str, bytes]) -> tuple[dict[str, ApiKey], dict[str, str]]:
    """The records that parse, and for each that does not, why."""
    good: dict[str, ApiKey] = {}
    bad: dict[str, str] = {}
    for key_id, raw in records.items():
        try:
            good[key_id] = decode(key_id, raw)
        except KeyFormatError as exc:
            bad[key_id] = str(exc)
    return good, bad


def ordered(keys: Iterable[ApiKey]) -> KeySet:
    """A hash has no order: list keys oldest first, as the keys file grows."""
    return tuple(sorted(keys, key=lambda k: (k.created, k.id)))


def diff(old: Iterable[ApiKey], new: Iterable[ApiKey]) -> tuple[dict[str, bytes], list[str]]:
    """What to HSET (changed or added records) and HDEL (removed ids) to go from old to new."""
    before = {k.id: k for k in old}
    after = {k.id: k for k in new}
    put = {i: encode(k) for i, k in after.items() if before.get(i) != k}
    gone = sorted(set(before) - set(after))
    return put, gone


def announcement(version: int, ids: Iterable[str]) -> str:
    return f"{version} {','.join(sorted(ids))}"


def parse_announcement(data: bytes | str) -> tuple[int, list[str]] | None:
    """(version, changed ids) of a channel message; None for one this module did not write."""
    text = data.decode() if isinstance(data, bytes) else data
    version, _, ids = text.partition(" ")
    if not version.isdigit():
        return None
    return int(version), [i for i in ids.split(",") if i]


def _text_keys(raw: Mapping[Any, Any]) -> dict[str, bytes]:
    # redis-py types its replies loosely; the client is made with decode_responses=False
    return {k.decode(): v for k, v in raw.items()}


class RedisKeyStore:
    """The key set in Redis with optimistic read-modify-write, for the CLI.

    Records that do not parse are left out of what ``load`` returns and of what ``change``
    sees, and are never overwritten (``unreadable`` names them after a read).
    """

    def __init__(self, link: SyncLink) -> None:
        self._link = link
        self._names = KeyNames.of(link)
        self.unreadable: dict[str, str] = {}

    @property
    def path(self) -> str:
        """Where the keys are, for messages."""
        return f"{self._link.where} {self._names.hash}"

    def load(self) -> KeySet:
        """The stored keys that parse; no hash holds no keys."""
        raw = self._link.client.hgetall(self._names.hash)
        return self._parse(_text_keys(raw))

    def update(self, change: Callable[[KeySet], tuple[KeySet, T]]) -> T:
        """Apply ``change`` to the stored keys and save what it returns (as ``KeyStore.update``).

        Only the records that changed are written; if ``change`` raises, nothing is.
        """
        names = self._names
        pipe: Any  # redis-py's Pipeline is partly untyped
        with self._link.client.pipeline(transaction=True) as pipe:
            for _ in range(MAX_ATTEMPTS):
                try:
                    pipe.watch(names.version, names.hash)
                    current = self._parse(_text_keys(pipe.hgetall(names.hash)))
                    new_keys, result = change(current)
                    put, gone = diff(current, new_keys)
                    if not put and not gone:
                        pipe.unwatch()
                        return result
                    self._check(new_keys, put)
                    pipe.multi()
                    self._write(pipe, put, gone)
                    pipe.execute()
                    return result
                except WatchError:
                    continue  # another writer got there first: read again
        raise KeyFileError(f"keys in Redis at {self._link.where} changed under {MAX_ATTEMPTS} "
                           "attempts in a row; try again")

    def _parse(self, records: dict[str, bytes]) -> KeySet:
        good, self.unreadable = decode_all(records)
        return ordered(good.values())

    def _check(self, new_keys: KeySet, put: Mapping[str, bytes]) -> None:
        check_unique(new_keys)  # never write a set that a watcher would refuse
        clash = sorted(set(put) & set(self.unreadable))
        if clash:
            raise KeyFileError(f"key record(s) {', '.join(clash)} in Redis are unreadable; "
                               "not overwriting them")

    def _write(self, pipe: Any, put: Mapping[str, bytes], gone: Sequence[str]) -> None:
        names = self._names
        if put:
            pipe.hset(names.hash, mapping=dict(put))
        if gone:
            pipe.hdel(names.hash, *gone)
        # INCR and PUBLISH in one script: the message names the version this change made
        pipe.eval(BUMP, 1, names.version, names.channel, ",".join(sorted([*put, *gone])))


class RedisKeyReader:
    """The gateway's reads of the key set, over the process's ``FleetLink`` (raise
    ``FleetDown`` when Redis is unreachable)."""

    def __init__(self, link: FleetLink) -> None:
        self._link = link
        self.names = KeyNames.of(link)
        self._all = link.script(READ_ALL)
        self._some = link.script(READ_SOME)

    async def version(self) -> int | None:
        raw = await self._link.command("GET", self.names.version)
        return None if raw is None else int(raw)

    async def read_all(self) -> Snapshot:
        # off the request path's connection: at 10,000 keys this is some 4 MB
        [(version, flat)] = await self._link.run_bulk(
            [(self._all, [self.names.hash, self.names.version], [])])
        records = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        return Snapshot(None if version is None else int(version), records)

    async def read_some(self, ids: Sequence[str]) -> tuple[int | None, dict[str, bytes | None]]:
        """The version now and the records of ``ids`` (None: the id is gone)."""
        version, values = await self._link.run(self._some, [self.names.hash, self.names.version],
                                               list(ids))
        return None if version is None else int(version), dict(zip(ids, values, strict=True))
