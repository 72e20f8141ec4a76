"""The fleet's usage in Redis (REDIS_URL, issue 23): the layout every replica and the CLI
share, the Lua scripts that write and read it, and how a script runs over many keys.

Layout, all of one API key under its hash tag (``FleetLink.of_key``), so each script touches
one slot:

    usage:<YYYYMMDD>   hash per UTC day: "<hour>|<model>|r|p|c" -> requests, prompt, completion
    usage:days         zset of those days (score: unix day), trimmed past the retention
    usage:last         the key's latest request time
    usage:applied      hash replica -> last batch sequence applied (exactly once: APPLY)
    usage:appliers     zset replica -> server time of its last apply (bounds ``applied``)
    usage:migrated     hash of what IMPORT added, per field (reruns add the difference)

and fleet-wide ``{usage}:keys``, the keys that have usage, for readers of the fleet's totals.
A day's hash expires ``retention_days`` + 1 days after the day began (EXPIREAT, not a TTL from
the write: an old buffer replayed late does not keep a day past the retention), and usage of
a day already past it is not written.

Writers: keys/usage_redis.py (a replica's batches, APPLY) and keys/usage_redis_import.py (the
migration's SQLite rows, IMPORT); readers: keys/usage_redis_read.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from fleet.link import FleetLink

DAY: Final = 86_400
KEEP_APPLIERS: Final = 7 * DAY  # Redis remembers a replica's last seq this long after its last apply
CHUNK: Final = 256  # script calls per pipeline when reading: one pipeline must beat the timeout

# One key's batch. KEYS: applied, appliers, days, last, then one day hash per day of ARGV.
# ARGV: replica, seq, last ('' none), retention days, seconds appliers are kept, then per day:
# unix day, day name, n, and n (field, increment) pairs.
APPLY: Final = """
local seq = tonumber(ARGV[2])
if seq <= tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') then return 0 end
local now = tonumber(redis.call('TIME')[1])
local keep = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - keep)) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
if ARGV[3] ~= '' then
  local old = redis.call('GET', KEYS[4])
  if not old or tonumber(old) < tonumber(ARGV[3]) then redis.call('SET', KEYS[4], ARGV[3]) end
end
local retention = tonumber(ARGV[4])
local first = math.floor(now / 86400) - retention + 1
local i = 6
for k = 5, #KEYS do
  local day, n = tonumber(ARGV[i]), tonumber(ARGV[i + 2])
  if day >= first then
    for j = i + 3, i + 1 + 2 * n, 2 do redis.call('HINCRBY', KEYS[k], ARGV[j], ARGV[j + 1]) end
    redis.call('EXPIREAT', KEYS[k], (day + retention + 1) * 86400)
    redis.call('ZADD', KEYS[3], day, ARGV[i + 1])
  end
  i = i + 3 + 2 * n
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', first - 1)
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], (retention + 1) * 86400) end
return 1
"""

# SQLite rows added once: KEYS: migrated, days, last, then the day hash of each row. ARGV: last
# ('' none), retention days, then per row: unix day, day name, "<hour>|<model>", r, p, c.
IMPORT: Final = """
local now = tonumber(redis.call('TIME')[1])
local retention = tonumber(ARGV[2])
local first = math.floor(now / 86400) - retention + 1
local changed, same, i = 0, 0, 3
for k = 4, #KEYS do
  local day = tonumber(ARGV[i])
  if day >= first then
    local moved = false
    for s, kind in ipairs({'|r', '|p', '|c'}) do
      local field = ARGV[i + 2] .. kind
      local diff = tonumber(ARGV[i + 2 + s]) - tonumber(redis.call('HGET', KEYS[1], field) or '0')
      if diff > 0 then
        redis.call('HINCRBY', KEYS[k], field, diff)
        redis.call('HINCRBY', KEYS[1], field, diff)
        moved = true
      end
    end
    if moved then
      changed = changed + 1
      redis.call('EXPIREAT', KEYS[k], (day + retention + 1) * 86400)
      redis.call('ZADD', KEYS[2], day, ARGV[i + 1])
    else
      same = same + 1
    end
  end
  i = i + 6
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', first - 1)
redis.call('EXPIRE', KEYS[1], (retention + 1) * 86400)
if ARGV[1] ~= '' then
  local old = redis.call('GET', KEYS[3])
  if not old or tonumber(old) < tonumber(ARGV[1]) then redis.call('SET', KEYS[3], ARGV[1]) end
end
return {changed, same}
"""

SADD: Final = "for _, k in ipairs(ARGV) do redis.call('SADD', KEYS[1], k) end return 1"
# Reads go as scripts too: the link sends one loop turn's scripts in one pipeline.
RANGE: Final = "return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[2])"
HGETALL: Final = "return redis.call('HGETALL', KEYS[1])"
GET: Final = "return redis.call('GET', KEYS[1])"


def day_name(ts: float) -> str:
    """The ``<YYYYMMDD>`` of a day hash: the UTC day of ``ts``."""
    return time.strftime("%Y%m%d", time.gmtime(ts))


async def run_many(link: FleetLink, source: str, calls: Sequence[tuple[list[str], list[Any]]],
                   chunk: int = CHUNK) -> list[Any]:
    """The answers of ``source`` called with each (keys, args) of ``calls``, ``chunk`` calls
    to a pipeline. Raises FleetDown."""
    script = link.script(source)
    out: list[Any] = []
    for i in range(0, len(calls), chunk):  # reports and imports: off the request path's connection
        out += await link.run_bulk([(script, k, a) for k, a in calls[i:i + chunk]])
    return out
