"""Tokens per minute (issue 21, risk): `max_tokens` 5000 on a 1000/min key was admitted
and charged as debt, overshooting the limit once per refill. A reservation that cannot fit
the key's whole bucket can never be granted: it is refused at once (400
`tokens_exceed_limit`, not a 429 to retry), and gives its request back. Usage above a
reservation still leaves a debt (the backend's usage is known only afterwards), capped at
one bucket's capacity."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gateway.policy import ratelimit
from gateway.policy.buckets import KeyLimiter, ReservationTooLarge, TokenBucket
from keys.model import Limits
from tests.support.fake_llama import MODEL, FakeLlama
from tests.support.gateway import auth_config, serve_gateway
from tests.support.keytool import KeyTool


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


async def test_the_gateway_answers_400_naming_the_limit(tmp_path: Path, keytool: KeyTool) -> None:
    _, secret = keytool.generate("small", "--tpm", "100")
    fake = FakeLlama()
    await fake.start()
    try:
        async with serve_gateway(fake.url, auth_config(tmp_path)) as gw, \
                aiohttp.ClientSession() as http, http.post(f"{gw.url}/v1/chat/completions", headers={
                "Authorization": f"Bearer {secret}"}, json={
                "model": MODEL, "max_tokens": 1000,  # under the context, over the key
                "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert (error["code"], error["param"]) == ("tokens_exceed_limit", "max_tokens")
        assert "100 tokens per minute" in error["message"]
        assert fake.requests("/v1/chat/completions") == []  # never forwarded
    finally:
        await fake.close()


def test_debt_is_capped_at_one_bucket() -> None:
    bucket = TokenBucket(600, 0.0)
    bucket.add(-100_000, 0.0)  # used far more than it reserved
    assert bucket.refill(0.0) == -600
    assert bucket.wait_for(1, 0.0) == pytest.approx(601 / 10)  # two minutes at most, not hours
