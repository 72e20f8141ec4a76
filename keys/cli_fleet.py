"""The CLI on a fleet (REDIS_URL): its key set, audit stream and usage totals, and the one
line it prints when Redis cannot be reached.

Keys and audit go through the synchronous client (keys/link_sync.py). Usage is read by
keys/usage_redis_read.py and imported by keys/usage_redis_import.py, both async over a
``FleetLink``: each such call runs on an event loop of its own, with a link made for it and
closed after (never started: a CLI command is no replica, so it sends no heartbeat).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

from redis.exceptions import RedisError, ResponseError

from fleet.link import FleetDown, FleetLink
from keys import usage_redis_import, usage_redis_read
from keys.audit_redis import RedisAuditSync
from keys.cli_context import RedisSettings
from keys.link_sync import CLI_TIMEOUT, SyncLink
from keys.store_redis import RedisKeyStore
from keys.usage import UsageRow

T = TypeVar("T")


class FleetCli:
    """What the CLI's commands use of the fleet's Redis, for one invocation."""

    # what ``explain`` turns into the command's one line on stderr (exit 1)
    errors: tuple[type[BaseException], ...] = (RedisError, FleetDown)

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self.link = SyncLink(settings.url, settings.prefix)
        self.store = RedisKeyStore(self.link)
        self.audit = RedisAuditSync(self.link, settings.audit_max_entries)
        # FleetLink logs Redis's going away; the CLI says it once, in its own line
        logging.getLogger("llamagate.fleet").addHandler(logging.NullHandler())

    @property
    def where(self) -> str:
        return self.link.where

    def last_used_all(self) -> dict[str, float]:
        return self._run(usage_redis_read.last_used_all)

    def usage(self, key_id: str | None, since: float | None, until: float | None) -> list[UsageRow]:
        rows: list[UsageRow] = self._run(
            lambda link: usage_redis_read.read_usage(link, key_id, since, until))
        return rows

    def import_usage(self, rows: Iterable[UsageRow], last_used: Mapping[str, float]) -> tuple[int, int]:
        """Add this machine's usage rows to the fleet's: (changed, already there)."""
        days = self._settings.usage_retention_days
        done: tuple[int, int] = self._run(
            lambda link: usage_redis_import.import_rows(link, rows, last_used, retention_days=days))
        return done

    def explain(self, exc: BaseException) -> str:
        """The line for a Redis failure: where, never REDIS_URL's password."""
        text = str(exc) or type(exc).__name__
        secret = urlsplit(self._settings.url).password
        text = text.replace(self._settings.url, self.where)
        if secret:
            text = text.replace(secret, "***")
        if isinstance(exc, ResponseError):
            return f"Redis at {self.where} refused the command: {text}"
        return f"Redis at {self.where} is unreachable: {text}"

    def close(self) -> None:
        self.link.close()

    def _run(self, work: Callable[[FleetLink], Awaitable[T]]) -> T:
        async def go() -> T:
            link = FleetLink(self._settings.url, self._settings.prefix, CLI_TIMEOUT)
            try:
                return await work(link)
            finally:
                await link.close()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(go())
        # called from code that runs a loop (a test, an embedding): a loop of its own elsewhere
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()
