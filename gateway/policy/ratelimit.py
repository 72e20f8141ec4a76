"""Per-key rate limits applied to requests: requests/min and tokens/min, concurrent requests.

The core (``TokenBucket``, ``KeyLimiter``, ``RateLimiter``) is in gateway/policy/buckets.py.
This is the shell: ``admit`` (request bucket and concurrency, by the pipeline's rate-limit
stage), ``settle`` (token settlement and usage recording once the handler is done),
``reserve_tokens`` (called by the proxy once the body says how many tokens may be
generated) and ``header_lines`` (the OpenAI ``x-ratelimit-*`` headers on every answer).

Tokens are reserved from ``max_tokens`` at admission and settled from the backend's
``usage`` afterwards; a request that used more than it reserved leaves the bucket in
debt (at most one bucket), which later requests pay back. A ``max_tokens`` above the
key's tokens per minute can never be reserved: 400 ``tokens_exceed_limit``. With
several gateway workers the numbers are shared through gateway/policy/shared_limits.py;
with a fleet (REDIS_URL) they are in Redis (gateway/policy/fleet_limits.py), and a
request's admission waits for ``admit_fleet``, awaited by the proxy once it knows the
request's ``max_tokens`` (by the pipeline for other routes): one round trip for all of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.errors import BadRequest, RateLimited
from gateway.exchange import Exchange
from gateway.policy.buckets import Clock, KeyLimiter, LimitExceeded, ReservationTooLarge
from gateway.policy.fleet_limits import Hold
from gateway.state import AppState
from keys.model import ApiKey, Limits

# Reserved when a request names no max_tokens: enough to stop a flood of open-ended
# requests, small enough not to refuse one; settlement corrects it either way.
DEFAULT_TOKEN_RESERVATION = 256


_UNLIMITED = Limits()


@dataclass(eq=False)
class Ticket:
    """One admitted request's hold on its key's limits. In a fleet: ``hold``, taken by
    ``admit_fleet`` (``pending`` until then), or neither for a key without limits."""

    limiter: KeyLimiter | None
    clock: Clock
    reserved: int = 0
    settled: bool = False
    hold: Hold | None = None
    pending: bool = False


def admit(state: AppState, key: ApiKey) -> Ticket | None:
    """Take the key's request and concurrency budget, or raise 429; None when unlimited."""
    fleet = state.fleet_limits
    if fleet is not None:  # nothing counted yet: admit_fleet does, with the tokens
        limits = fleet.resolve(key.id, key.limits)
        if limits == _UNLIMITED and not fleet.closed_now():
            return Ticket(None, time.monotonic)  # settled only to record usage
        return Ticket(None, time.monotonic, hold=Hold(key.id, limits), pending=True)
    limiter = state.limiter
    if limiter is None:
        return None
    key_limiter = limiter.for_key(key.id, key.limits)
    ticket = Ticket(key_limiter, limiter.clock)
    try:
        key_limiter.admit(ticket.clock())
    except LimitExceeded as exc:
        state.metrics.rejections_for("key_rate_limit").inc()
        raise RateLimited(f"rate limit reached for this API key: {exc.what}",
                          retry_after=exc.retry_after, headers=key_limiter.headers(
                              ticket.clock())) from None
    return ticket


async def admit_fleet(state: AppState, ticket: Ticket, ex: Exchange | None) -> None:
    """A fleet ticket's admission in Redis: its slot, request and tokens (the reservation,
    for an inference request ``ex``), or the 429 that refuses them."""
    fleet, hold = state.fleet_limits, ticket.hold
    ticket.pending = False
    if fleet is None or hold is None:
        return
    inference = ex is not None and ex.inference
    asked = ex.max_tokens if ex is not None and inference else None
    tokens = asked or (DEFAULT_TOKEN_RESERVATION if inference else 0)
    try:
        await fleet.admit(hold, tokens, asked is not None, inference)
    except RateLimited as refused:
        ticket.settled = True  # nothing was taken
        state.metrics.rejections_for("key_token_limit" if refused.code == "tokens_rate_limit_exceeded"
                                     else "key_rate_limit").inc()
        raise
    except BaseException:
        ticket.settled = True
        raise
    ticket.reserved = hold.reserved


def settle(state: AppState, ticket: Ticket, key: ApiKey, ex: Exchange) -> None:
    """The request is over: give back its slot, charge what it used, record its usage.
    Once per ticket: the proxy settles before it answers, so the answer's headers count it."""
    if ticket.settled:
        return
    ticket.settled = True
    if ticket.limiter is not None:
        ticket.limiter.release(ticket.reserved, _tokens_used(ex), ticket.clock())
    elif ticket.hold is not None and not ticket.pending and state.fleet_limits is not None:
        state.fleet_limits.release(ticket.hold, _tokens_used(ex))
    if state.usage is not None and ex.inference and ex.tokens is not None:
        # Usage is recorded here because this is where a finished request is settled.
        state.usage.record(key.id, ex.model, ex.tokens[0], ex.tokens[1], time.time())


def _tokens_used(ex: Exchange) -> int | None:
    if ex.tokens is not None:
        return ex.tokens[0] + ex.tokens[1]
    if ex.first_byte_at is None and not ex.completed:
        return 0  # the backend never answered: nothing was spent
    return None  # it answered without usage: keep the reservation as the charge


def reserve_tokens(state: AppState, ticket: Ticket | None, ex: Exchange) -> None:
    """Reserve the inference request's tokens, or raise 429. Called by the proxy."""
    if ticket is None or ticket.limiter is None or not ex.inference:
        return  # (a fleet ticket reserves in admit_fleet)
    try:
        asked = ex.max_tokens
        ticket.reserved = ticket.limiter.reserve(asked or DEFAULT_TOKEN_RESERVATION,
                                                 ticket.clock(), asked is not None)
    except ReservationTooLarge as too_large:  # (two names: mypyc types one per exception)
        # never a 429: waiting would not help, the key's whole minute is less than asked
        raise BadRequest(f"max_tokens is {too_large.asked}; this API key may use "
                         f"{too_large.capacity} tokens per minute", code="tokens_exceed_limit",
                         param="max_tokens") from None
    except LimitExceeded as exceeded:
        state.metrics.rejections_for("key_token_limit").inc()
        raise RateLimited(f"rate limit reached for this API key: {exceeded.what}",
                          code="tokens_rate_limit_exceeded",
                          retry_after=exceeded.retry_after) from None


def header_lines(ticket: Ticket | None) -> str:
    """The key's limits and what is left of them, as response header lines."""
    if ticket is None:
        return ""
    if ticket.limiter is not None:
        headers = ticket.limiter.headers(ticket.clock())
    elif ticket.hold is not None:
        headers = ticket.hold.headers  # the fleet's view at admission
    else:
        return ""
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items())
