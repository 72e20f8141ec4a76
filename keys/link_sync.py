"""The CLI's connection to the fleet's Redis: fleet/link.py's synchronous twin.

A `keys` command runs one short transaction and exits, so it needs none of the link's
batching, probing or heartbeat: a plain redis-py client, and the key names spelled exactly as
``FleetLink`` spells them (tests/keys/test_redis_keys.py pins that the two agree).
"""

from __future__ import annotations

import redis

from fleet.link import describe

CLI_TIMEOUT = 5.0  # seconds: an operator's command may wait longer than a request (REDIS_TIMEOUT)


class SyncLink:
    """A redis-py client and the fleet's key names, for one CLI invocation."""

    def __init__(self, url: str, prefix: str = "llamagate:", timeout: float = CLI_TIMEOUT, *,
                 client: redis.Redis | None = None) -> None:
        self.prefix = prefix
        self.where = describe(url)  # for messages: the URL without its password
        self.client = client or redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False)

    def of_key(self, key_id: str, what: str) -> str:
        """A record of one API key's, as ``FleetLink.of_key`` names it."""
        return f"{self.prefix}{{{key_id}}}:{what}"

    def name(self, tag: str, what: str = "") -> str:
        """A fleet-wide record, as ``FleetLink.name`` names it."""
        return f"{self.prefix}{{{tag}}}" + (f":{what}" if what else "")

    def close(self) -> None:
        self.client.close()
