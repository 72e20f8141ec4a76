"""Tokens per minute (issue 21, risk): `max_tokens` 5000 on a 1000/min key was admitted
and charged as debt, overshooting the limit once per refill. A reservation that cannot fit
the key's whole bucket can never be granted: it is refused at once (400
`tokens_exceed_limit`, not a 429 to retry), and gives its request back. Usage above a
reservation still leaves a debt (the backend's usage is known only afterwards), capped at
one bucket's capacity."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest
from gateway.exchange import Exchange
from gateway.policy import ratelimit
from gateway.policy.buckets import KeyLimiter, ReservationTooLarge, TokenBucket
from keys.model import Limits


def test_a_reservation_above_the_bucket_is_refused_and_gives_its_request_back() -> None:
    limiter = KeyLimiter(Limits(requests_per_minute=2, tokens_per_minute=1000), now=0.0)
    limiter.admit(0.0)
    with pytest.raises(ReservationTooLarge) as info:
        limiter.reserve(5000, 0.0)
    assert info.value.capacity == 1000
    limiter.release(0, 0, 0.0)
    assert limiter.headers(0.0)["x-ratelimit-remaining-tokens"] == "1000"  # nothing charged
    assert limiter.headers(0.0)["x-ratelimit-remaining-requests"] == "2"  # given back
    limiter.admit(0.0)
    assert limiter.reserve(1000, 0.0) == 1000  # a whole bucket fits


def test_a_default_reservation_is_capped_not_refused() -> None:
    """A request that names no max_tokens did not ask for more than the key may use."""
    limiter = KeyLimiter(Limits(tokens_per_minute=100), now=0.0)
    limiter.admit(0.0)
    assert limiter.reserve(ratelimit.DEFAULT_TOKEN_RESERVATION, 0.0, asked=False) == 100


def test_the_proxy_gets_a_400_naming_the_limit() -> None:
    class Ticket:
        limiter = KeyLimiter(Limits(tokens_per_minute=1000), now=0.0)
        reserved = 0

        @staticmethod
        def clock() -> float:
            return 0.0

    ex = Exchange(request_id="r", route="/v1/completions")
    ex.inference, ex.max_tokens = True, 5000
    with pytest.raises(BadRequest) as info:
        ratelimit.reserve_tokens(None, Ticket(), ex)  # type: ignore[arg-type]
    assert info.value.code == "tokens_exceed_limit" and info.value.param == "max_tokens"
    assert "1000" in info.value.message


def test_debt_is_capped_at_one_bucket() -> None:
    bucket = TokenBucket(600, 0.0)
    bucket.add(-100_000, 0.0)  # used far more than it reserved
    assert bucket.refill(0.0) == -600
    assert bucket.wait_for(1, 0.0) == pytest.approx(601 / 10)  # two minutes at most, not hours
