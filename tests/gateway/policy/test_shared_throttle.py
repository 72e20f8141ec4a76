"""GATEWAY_WORKERS > 1: failed authentications are counted per address across workers
(gateway/policy/shared_throttle.py). First two workers' views of one file in this process, on a
stopped clock; then the real service with two workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.policy.shared_throttle import SharedAddressThrottle
from tests.gateway.policy.test_ratelimit import Clock
from tests.support.fake_llama import FakeLlama
from tests.support.keytool import KeyTool
from tests.support.service import two_worker_service, worker_pids

Views = Callable[..., tuple[SharedAddressThrottle, SharedAddressThrottle]]


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Views]:
    """Two workers' throttles on one file, each creating it if it is not there (closed after)."""
    made: list[SharedAddressThrottle] = []
    clock = Clock()

    def make(per_minute: int, buckets: int = 64
             ) -> tuple[SharedAddressThrottle, SharedAddressThrottle]:
        for _ in range(2):
            made.append(SharedAddressThrottle(tmp_path / "auth_failures.bin", per_minute,
                                              buckets=buckets, clock=clock))
        return made[-2], made[-1]

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for throttle in made:
        throttle.close()


def test_failures_on_any_worker_count_for_the_address(two_workers: Views) -> None:
    a, b = two_workers(3)
    a.failure("10.0.0.1")
    b.failure("10.0.0.1")
    assert a.retry_after("10.0.0.1") == 0 and b.retry_after("10.0.0.1") == 0
    a.failure("10.0.0.1")
    # three failures in all: a fourth would be over the budget, on either worker
    assert b.retry_after("10.0.0.1") == pytest.approx(20.0)
    assert a.retry_after("10.0.0.1") == pytest.approx(20.0)
    assert b.retry_after("10.0.0.2") == 0  # another address is unaffected
    two_workers.clock.now += 20.0  # type: ignore[attr-defined]
    assert a.retry_after("10.0.0.1") == 0


def test_an_ipv6_client_is_counted_by_its_64_across_workers(two_workers: Views) -> None:
    a, b = two_workers(2)
    a.failure("2001:db8:1:2::1")
    b.failure("2001:db8:1:2:ffff::9")
    assert a.retry_after("2001:db8:1:2::77") > 0
    assert b.retry_after("2001:db8:1:3::1") == 0


def test_a_full_bucket_gives_up_the_address_whose_budget_returns_first(two_workers: Views) -> None:
    a, b = two_workers(1, buckets=1)  # one bucket of 8: every address shares it
    clock = two_workers.clock  # type: ignore[attr-defined]
    addresses = [f"10.0.1.{i}" for i in range(9)]
    for address in addresses:
        (a if address.endswith(("1", "3", "5", "7")) else b).failure(address)
        clock.now += 1.0
    assert a.retry_after(addresses[0]) == 0  # the first to fail was dropped for the ninth
    assert all(b.retry_after(x) > 0 for x in addresses[1:])


@pytest.mark.llama_server
async def test_two_workers_throttle_an_address_once(metered_fake: FakeLlama, tmp_path: Path) -> None:
    keys = KeyTool(tmp_path / "data" / "keys.json", tmp_path / "data" / "usage.db")
    keys.generate("someone")
    async with two_worker_service(tmp_path, metered_fake, keys, AUTH_FAILURES_PER_MINUTE="4") as svc:
        statuses = []
        for _ in range(12):  # a new connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as fresh, fresh.get(
                    svc.url + "/v1/models", headers={"Authorization": "Bearer lg-guess"}) as r:
                statuses.append(r.status)
        # a budget per worker would have let up to 8 guesses be looked at
        assert statuses == [401] * 4 + [429] * 8
        assert len(worker_pids(svc)) == 2
