"""Per-key limits counted by the whole fleet in Redis (REDIS_URL): requests and tokens per
minute and concurrent requests, one round trip to admit a request and one, not waited
for, to end it.

A request's admission is one Lua script (``ADMIT``), run when the proxy knows how many
tokens to reserve (its ``max_tokens``): it checks and takes the key's concurrency slot,
its request and its token reservation together, or takes nothing; so a request refused
for tokens has not used up a request. The buckets are gateway/policy/buckets.py's
(capacity per minute, refilled continuously, a debt of at most one bucket), kept in a
hash per key with Redis's clock, so replicas whose clocks differ agree. A bucket idle for
three minutes is whole again, which is what its key expiring means: idle keys cost
nothing. The answer carries what is left, for the ``x-ratelimit-*`` headers: the fleet's
view at admission.

A concurrency slot is a member of the key's sorted set, scored with its lease's end:
admission drops expired members before it counts. This process renews its members every
third of REDIS_LEASE_SECONDS while their requests run, so a replica that dies (SIGKILL, a
lost host) gives its slots back within a lease. The end of a request (``SETTLE``) gives
its slot back and corrects the token reservation with the tokens used; it goes out with
the next loop turn's pipeline and nothing waits for it.

Redis unreachable (gateway/fleet link down): with REDIS_FAILURE_MODE=open each key is
limited here alone, to its share of each limit (the limit over the replicas last seen
in Redis, rounded up); with ``closed`` inference is answered 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from redis.exceptions import ResponseError

from fleet.link import FleetDown, FleetLink
from gateway.errors import BackendUnavailable, BadRequest, RateLimited
from gateway.policy.buckets import (
    KeyLimiter,
    LimitExceeded,
    RateLimiter,
    format_reset,
)
from keys.model import Limits

log = logging.getLogger("llamagate.gateway.limits")

# bucket fields: rl/rt the requests bucket's level and when it was set, tl/tt the tokens'
_LEVEL = """
local function level(name, cap, now)
  local v = redis.call('HMGET', KEYS[1], name .. 'l', name .. 't')
  local l, u = tonumber(v[1]), tonumber(v[2])
  if l == nil then return cap end
  if now > u then l = math.min(cap, l + (now - u) * cap / 60) end
  return math.min(cap, l)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
-- ended requests: their slots (ARGV[first..]) back, ``delta`` tokens given back
local function settle(tpm, delta, first)
  if first <= #ARGV then redis.call('ZREM', KEYS[2], unpack(ARGV, first, #ARGV)) end
  if tpm > 0 and delta ~= 0 then
    local l = math.max(-tpm, math.min(tpm, level('t', tpm, now) + delta))
    redis.call('HSET', KEYS[1], 'tl', l, 'tt', now)
    redis.call('PEXPIRE', KEYS[1], 180000)
  end
end
"""

# KEYS: the key's buckets, its slots. ARGV: rpm, tpm, concurrency (0: none), tokens to
# reserve, whether the client asked for them (1) or it is the default, slot name, lease;
# then the key's requests that ended since its last call from here: the tokens per minute
# they were charged under, the tokens they give back, their slots. Answer: {0, reserved,
# requests left, tokens left} or {why, wait ms or capacity}, why: 1 concurrency, 2
# requests, 3 tokens, 4 more tokens asked than a minute holds.
ADMIT = _LEVEL + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want = tonumber(ARGV[4])
settle(tonumber(ARGV[8]), tonumber(ARGV[9]), 10)
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {1, 1000} end
end
local rl, tl = 0, 0
if rpm > 0 then
  rl = level('r', rpm, now)
  if rl < 1 then return {2, math.ceil((1 - rl) * 60000 / rpm)} end
end
if tpm > 0 then
  if want > tpm then
    if ARGV[5] == '1' then return {4, tpm} end
    want = tpm
  end
  tl = level('t', tpm, now)
  if tl < want then return {3, math.ceil((want - tl) * 60000 / tpm)} end
else
  want = 0
end
if rpm > 0 then rl = rl - 1; redis.call('HSET', KEYS[1], 'rl', rl, 'rt', now) end
if tpm > 0 then tl = tl - want; redis.call('HSET', KEYS[1], 'tl', tl, 'tt', now) end
if rpm > 0 or tpm > 0 then redis.call('PEXPIRE', KEYS[1], 180000) end
if conc > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[6])
  redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[7]) * 2000))
end
return {0, want, tostring(rl), tostring(tl)}
"""

# KEYS: buckets, slots. ARGV: tpm, tokens to give back (negative: charge), then the slots
# of the requests that ended
SETTLE = _LEVEL + """
settle(tonumber(ARGV[1]), tonumber(ARGV[2]), 3)
return 1
"""

# KEYS: slots. ARGV: lease, then the slot names of this replica's requests still running
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 2000))
return 1
"""

_WHY = {1: "concurrent requests", 2: "requests per minute", 3: "tokens per minute"}
_NOTHING_OWED = (0, 0)
# seconds the end of a request may wait for its key's next admission to carry it to Redis
SETTLE_WITHIN = 0.005


class Hold:
    """One request's hold on its key's limits in the fleet: what ``admit`` took."""

    __slots__ = ("key_id", "limits", "member", "reserved", "local", "headers")

    def __init__(self, key_id: str, limits: Limits) -> None:
        self.key_id = key_id
        self.limits = limits  # resolved against the service defaults
        self.member = ""  # its slot's name in Redis, while it holds one
        self.reserved = 0
        self.local: KeyLimiter | None = None  # admitted here alone, Redis being down
        self.headers: dict[str, str] = {}


class FleetLimiter:
    def __init__(self, link: FleetLink, defaults: Limits, lease: float, fail_open: bool) -> None:
        self.link = link
        self.defaults = defaults
        self.lease = lease
        self.fail_open = fail_open
        self._admit = link.script(ADMIT)
        self._settle = link.script(SETTLE)
        self._renew = link.script(RENEW)
        self._resolved: dict[str, tuple[Limits, Limits]] = {}  # key id: (its own, resolved)
        self._shares = RateLimiter(Limits())  # while Redis is down: a share of each limit here
        self._share_of: dict[str, tuple[Limits, int, Limits]] = {}  # of limits, size: share
        self._held: dict[str, dict[str, Hold]] = {}  # key id → its running requests' slots
        # key id → [its tokens per minute, tokens to give back, slots to free] of its requests
        # that ended
        self._owed: dict[str, list[Any]] = {}
        self._settling: asyncio.TimerHandle | None = None
        self._names_of: dict[str, tuple[str, str]] = {}
        link.on_up.append(self._settle_soon)
        self._seq = 0
        self._alone = False  # logged: limits are per replica until Redis answers
        self._task: asyncio.Task[None] | None = None

    def closed_now(self) -> bool:
        """REDIS_FAILURE_MODE=closed with Redis unreachable: inference is refused for every
        key, one without limits too (``admit`` says so)."""
        return not self.fail_open and not self.link.up

    def resolve(self, key_id: str, limits: Limits) -> Limits:
        known = self._resolved.get(key_id)
        if known is not None and known[0] is limits:
            return known[1]
        resolved = limits.resolve(self.defaults)
        self._resolved[key_id] = (limits, resolved)
        return resolved

    async def admit(self, hold: Hold, tokens: int, asked: bool, inference: bool) -> None:
        """Take the request's slot, request and tokens, or raise the refusal."""
        lim = hold.limits
        member = ""
        if lim.max_concurrent is not None:
            self._seq += 1
            member = f"{self.link.replica}:{self._seq}"
        if self.link.up:
            owed = self._owed.pop(hold.key_id, None)  # ended requests of this key: same call
            try:
                answer = await self.link.run(
                    self._admit, self._names(hold.key_id),
                    (lim.requests_per_minute or 0, lim.tokens_per_minute or 0,
                     lim.max_concurrent or 0, tokens, 1 if asked else 0, member, self.lease,
                     *(owed or _NOTHING_OWED)))
            except BaseException as exc:
                # the call may have reached Redis (its answer lost to a timeout, the client
                # gone): its slot, if it took one, is given back with the key's next call
                # rather than held for a lease; what it owed still is
                self._owe(hold.key_id, owed, member)
                if isinstance(exc, ResponseError):  # Redis answers but refuses: READONLY, OOM
                    self.link.failed(exc)
                elif not isinstance(exc, FleetDown):
                    raise  # cancelled: the client left
            else:
                self._alone = False
                self._admitted(hold, answer, member, tokens)
                return
        self._admit_here(hold, tokens, inference)

    def _admitted(self, hold: Hold, answer: list[Any], member: str, tokens: int) -> None:
        why = int(answer[0])
        lim = hold.limits
        if why == 4:
            raise BadRequest(f"max_tokens is {tokens}; this API key may use "
                             f"{int(answer[1])} tokens per minute", code="tokens_exceed_limit",
                             param="max_tokens")
        if why:
            wait = int(answer[1]) / 1000
            what = _WHY[why]
            limit = {1: lim.max_concurrent, 2: lim.requests_per_minute,
                     3: lim.tokens_per_minute}[why]
            # the bucket that refused, as the headers of an answer it admitted would show it
            name = {2: "requests", 3: "tokens"}.get(why)
            refused = {} if name is None else {
                f"x-ratelimit-limit-{name}": str(limit), f"x-ratelimit-remaining-{name}": "0",
                f"x-ratelimit-reset-{name}": format_reset(wait)}
            raise RateLimited(f"rate limit reached for this API key: {limit} {what}",
                              code="tokens_rate_limit_exceeded" if why == 3 else None,
                              retry_after=wait, headers=refused)
        hold.reserved = int(answer[1])
        if member:
            hold.member = member
            self._held.setdefault(hold.key_id, {})[member] = hold
        hold.headers = _headers(lim, float(answer[2]), float(answer[3]))

    def _admit_here(self, hold: Hold, tokens: int, inference: bool) -> None:
        """Redis is down: the closed mode refuses inference, the open one (and the closed
        one, for listings and admin reads) limits this replica alone."""
        if not self.fail_open and inference:
            raise BackendUnavailable("the fleet's Redis is unreachable, and this service "
                                     "refuses inference until it answers (REDIS_FAILURE_MODE="
                                     "closed)", code="fleet_unavailable", retry_after=2)
        if not self._alone:
            self._alone = True
            log.warning("Redis unreachable: limiting each key per replica, to 1/%s of its limits",
                        self.link.fleet_size or 1)
        limiter = self._shares.for_key(hold.key_id, self._share(hold.key_id, hold.limits))
        now = time.monotonic()
        try:
            limiter.admit(now)
            try:
                # capped at this replica's share, never refused as too large: the fleet's limit
                # may hold it once Redis is back
                hold.reserved = limiter.reserve(tokens, now, False)
            except BaseException:
                limiter.release(0, 0, now)
                raise
        except LimitExceeded as exceeded:
            raise RateLimited(f"rate limit reached for this API key: {exceeded.what} on this "
                              "replica while the fleet's Redis is unreachable",
                              retry_after=exceeded.retry_after) from None
        hold.local = limiter
        hold.headers = limiter.headers(now)

    def _share(self, key_id: str, limits: Limits) -> Limits:
        size = max(1, self.link.fleet_size or 1)
        known = self._share_of.get(key_id)
        if known is not None and known[0] is limits and known[1] == size:
            return known[2]

        def part(n: int | None) -> int | None:
            return None if n is None else max(1, math.ceil(n / size))
        share = Limits(part(limits.requests_per_minute), part(limits.tokens_per_minute),
                       part(limits.max_concurrent))
        self._share_of[key_id] = (limits, size, share)
        return share

    def release(self, hold: Hold, used: int | None) -> None:
        """The request is over: its slot back, its reservation corrected (not waited for)."""
        give_back = 0 if used is None else hold.reserved - used
        if hold.local is not None:
            hold.local.release(hold.reserved, used, time.monotonic())
            return
        member, hold.member = hold.member, ""
        if member:
            held = self._held.get(hold.key_id)
            if held is not None:
                held.pop(member, None)
                if not held:
                    del self._held[hold.key_id]
        tpm = hold.limits.tokens_per_minute or 0
        if not member and not (tpm and give_back):
            return
        # owed to Redis until the key's next admission from here carries it, or SETTLE_WITHIN
        # (while Redis is unreachable: until it answers again)
        owed = self._owed.get(hold.key_id)
        if owed is None:
            owed = self._owed[hold.key_id] = [tpm, 0]
        if tpm:
            owed[1] += give_back
        if member:
            owed.append(member)
        self._settle_soon()

    def _owe(self, key_id: str, owed: list[Any] | None, member: str) -> None:
        """An admission that failed: what it carried is owed again, and its slot too."""
        again = self._owed.get(key_id)
        if owed is not None:
            if again is None:
                again = self._owed[key_id] = owed
            else:
                again[1] += owed[1]
                again.extend(owed[2:])
        if member:
            if again is None:
                again = self._owed[key_id] = [0, 0]
            again.append(member)
        if again is not None:
            self._settle_soon()

    def _settle_soon(self) -> None:
        if self._settling is None and self.link.up:
            self._settling = self.link.loop_now().call_later(SETTLE_WITHIN, self._settle_owed)

    def _settle_owed(self) -> None:
        """What no admission carried within SETTLE_WITHIN: one SETTLE per key, in one write
        (kept while Redis is unreachable, and sent when it answers: link.on_up)."""
        self._settling = None
        if not self._owed or not self.link.up:
            return
        owed, self._owed = self._owed, {}
        calls = [(self._settle, self._names(key_id), what) for key_id, what in owed.items()]
        for done in self.link.run_all(calls):
            done.add_done_callback(_quiet)

    def _names(self, key_id: str) -> tuple[str, str]:
        names = self._names_of.get(key_id)
        if names is None:
            if len(self._names_of) >= 65_536:
                self._names_of.clear()
            names = self._names_of[key_id] = (self.link.of_key(key_id, "limits"),
                                              self.link.of_key(key_id, "slots"))
        return names

    # leases ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._renewing(), name="fleet-leases")

    async def close(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
            self._settle_owed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _renewing(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            if not self.link.up or not self._held:
                continue
            renewals = self.link.run_all([(self._renew, self._names(key_id)[1:],
                                           (self.lease, *held))
                                          for key_id, held in self._held.items()])
            await asyncio.gather(*renewals, return_exceptions=True)


def _headers(lim: Limits, requests_left: float, tokens_left: float) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, cap, left in (("requests", lim.requests_per_minute, requests_left),
                            ("tokens", lim.tokens_per_minute, tokens_left)):
        if cap:
            out[f"x-ratelimit-limit-{name}"] = str(cap)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(left)))
            out[f"x-ratelimit-reset-{name}"] = format_reset((cap - left) / (cap / 60.0))
    return out


def _quiet(done: asyncio.Future[Any]) -> None:
    """A settlement's answer, read so that a failure (Redis down) is not reported unread."""
    if not done.cancelled():
        done.exception()
