"""The rate limit core with an injected clock: buckets, per-key limits, the failure throttle."""

from __future__ import annotations

import pytest

from gateway.policy.buckets import (
    KeyLimiter,
    LimitExceeded,
    RateLimiter,
    ReservationTooLarge,
    TokenBucket,
    format_reset,
)
from gateway.policy.throttle import AddressThrottle
from keys.model import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_continuously_up_to_capacity() -> None:
    bucket = TokenBucket(60, now=0.0)
    bucket.add(-60, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)
    assert bucket.refill(30.0) == pytest.approx(30)
    assert bucket.refill(1000.0) == 60  # never above capacity
    assert bucket.reset_after(1000.0) == 0


def test_requests_per_minute() -> None:
    limiter = KeyLimiter(Limits(requests_per_minute=3), now=0.0)
    for _ in range(3):
        limiter.admit(0.0)
        limiter.release(0, 0, 0.0)
    with pytest.raises(LimitExceeded) as info:
        limiter.admit(0.0)
    assert info.value.retry_after == pytest.approx(20.0)  # one request every 20 s
    assert "3 requests per minute" in info.value.what
    limiter.admit(20.0)


def test_concurrency_is_held_until_release() -> None:
    limiter = KeyLimiter(Limits(max_concurrent=2), now=0.0)
    limiter.admit(0.0)
    limiter.admit(0.0)
    with pytest.raises(LimitExceeded) as info:
        limiter.admit(0.0)
    assert info.value.retry_after == 1.0
    limiter.release(0, None, 0.0)
    limiter.admit(0.0)
    assert limiter.in_flight() == 2


def test_a_concurrency_refusal_takes_no_request() -> None:
    limiter = KeyLimiter(Limits(requests_per_minute=10, max_concurrent=1), now=0.0)
    limiter.admit(0.0)
    with pytest.raises(LimitExceeded):
        limiter.admit(0.0)
    assert limiter.headers(0.0)["x-ratelimit-remaining-requests"] == "9"


def test_tokens_are_reserved_then_settled_from_usage() -> None:
    limiter = KeyLimiter(Limits(tokens_per_minute=1000), now=0.0)
    limiter.admit(0.0)
    assert limiter.reserve(600, 0.0) == 600
    limiter.admit(0.0)
    with pytest.raises(LimitExceeded) as info:
        limiter.reserve(600, 0.0)
    assert info.value.retry_after == pytest.approx(200 / (1000 / 60))
    limiter.release(600, 100, 0.0)  # used far less than it reserved: the rest comes back
    assert limiter.reserve(600, 0.0) == 600
    assert limiter.headers(0.0)["x-ratelimit-remaining-tokens"] == "300"


def test_usage_above_the_reservation_leaves_a_debt() -> None:
    limiter = KeyLimiter(Limits(tokens_per_minute=600), now=0.0)
    limiter.admit(0.0)
    reserved = limiter.reserve(100, 0.0)
    limiter.release(reserved, 900, 0.0)  # -300 now
    limiter.admit(0.0)
    with pytest.raises(LimitExceeded) as info:
        limiter.reserve(10, 0.0)
    assert info.value.retry_after == pytest.approx(310 / 10)  # 10 tokens a second
    assert limiter.headers(0.0)["x-ratelimit-remaining-tokens"] == "0"
    assert limiter.reserve(10, 31.0) == 10


def test_unknown_usage_keeps_the_reservation() -> None:
    limiter = KeyLimiter(Limits(tokens_per_minute=600), now=0.0)
    limiter.admit(0.0)
    limiter.release(limiter.reserve(100, 0.0), None, 0.0)
    assert limiter.headers(0.0)["x-ratelimit-remaining-tokens"] == "500"


def test_a_reservation_above_the_budget_is_refused_unless_it_was_not_asked_for() -> None:
    # issue 21: admitted, a max_tokens above the bucket overshot the limit as a debt
    limiter = KeyLimiter(Limits(tokens_per_minute=100), now=0.0)
    limiter.admit(0.0)
    with pytest.raises(ReservationTooLarge):
        limiter.reserve(5000, 0.0)
    assert limiter.reserve(5000, 0.0, asked=False) == 100


def test_a_token_refusal_gives_the_request_back() -> None:
    limiter = KeyLimiter(Limits(requests_per_minute=5, tokens_per_minute=10), now=0.0)
    limiter.admit(0.0)
    limiter.reserve(10, 0.0)
    limiter.admit(0.0)
    with pytest.raises(LimitExceeded):
        limiter.reserve(10, 0.0)
    limiter.release(0, 0, 0.0)
    assert limiter.headers(0.0)["x-ratelimit-remaining-requests"] == "4"


def test_headers_in_openai_form() -> None:
    limiter = KeyLimiter(Limits(requests_per_minute=10, tokens_per_minute=6000), now=0.0)
    limiter.admit(0.0)
    limiter.reserve(3000, 0.0)
    assert limiter.headers(0.0) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "3000",
        "x-ratelimit-reset-tokens": "30s",
    }
    assert KeyLimiter(Limits(), now=0.0).headers(0.0) == {}  # unlimited: nothing to report


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0ms"), (0.0201, "21ms"), (1.0, "1s"), (59.2, "1m0s"), (90, "1m30s"), (6.5, "7s")])
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_limiter_resolves_defaults_and_follows_reloaded_limits() -> None:
    clock = Clock()
    limiter = RateLimiter(Limits(requests_per_minute=2, max_concurrent=None), clock)
    own = limiter.for_key("a", Limits(requests_per_minute=10))
    assert own.limits.requests_per_minute == 10
    default = limiter.for_key("b", Limits())
    assert default.limits == Limits(requests_per_minute=2)
    assert limiter.for_key("b", Limits()) is default
    default.admit(clock())
    # a reload gave the key its own, larger limit: the request already taken stays taken
    grown = limiter.for_key("b", Limits(requests_per_minute=4, tokens_per_minute=50))
    assert grown is default
    assert grown.headers(clock())["x-ratelimit-remaining-requests"] == "1"
    assert grown.headers(clock())["x-ratelimit-remaining-tokens"] == "50"
    assert limiter.for_key("b", Limits(requests_per_minute=None)).requests is not None


def test_a_key_given_a_limit_by_a_reload_counts_what_is_in_flight() -> None:
    clock = Clock()
    limiter = RateLimiter(Limits(), clock)
    free = limiter.for_key("k", Limits())
    for _ in range(3):
        free.admit(clock())
    capped = limiter.for_key("k", Limits(max_concurrent=2))
    assert capped is free and capped.in_flight() == 3
    with pytest.raises(LimitExceeded, match="2 concurrent"):
        capped.admit(clock())


def test_failure_throttle_is_per_address() -> None:
    clock = Clock()
    throttle = AddressThrottle(3, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") == 0
        throttle.failure("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == pytest.approx(20.0)
    assert throttle.retry_after("10.0.0.2") == 0
    clock.now += 20.0
    assert throttle.retry_after("10.0.0.1") == 0


def test_failure_throttle_tracks_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    throttle = AddressThrottle(1, max_addresses=2, clock=clock)
    for address in ("a", "b", "c"):
        throttle.failure(address)
    assert throttle.retry_after("a") == 0  # the least recent was dropped
    assert throttle.retry_after("b") > 0 and throttle.retry_after("c") > 0


def test_failure_throttle_counts_an_ipv6_client_by_its_64() -> None:
    throttle = AddressThrottle(2, clock=Clock())
    throttle.failure("2001:db8:1:2::1")
    throttle.failure("2001:db8:1:2:ffff::9")  # another address of the same /64
    assert throttle.retry_after("2001:db8:1:2::77") > 0
    assert throttle.retry_after("2001:db8:1:3::1") == 0  # the next /64 is someone else
    # a dual-stack socket's IPv4 peer is that IPv4 address
    throttle.failure("::ffff:192.0.2.1")
    throttle.failure("192.0.2.1")
    assert throttle.retry_after("192.0.2.1") > 0 and throttle.retry_after("192.0.2.2") == 0
