"""An external backend (BACKEND_URL) followed through its /health, without the serve
process: a busy server's unanswered polls do not turn every request into a 503 at once."""

from __future__ import annotations

import asyncio
import contextlib

from backend.external import MISSES
from gateway.upstream.backend import Upstream
from tests.support.fake_llama import FakeLlama
from tests.support.wait import wait_until


async def test_a_ready_backend_counts_as_unreachable_only_after_misses_polls_in_a_row(
        fake: FakeLlama) -> None:
    upstream = Upstream(fake.url, None, pool_size=1)
    await upstream.open()
    # what the gateway believed as each poll arrived: the outcome of the polls before it
    ready_at: list[bool] = []
    fake.on_health = lambda: ready_at.append(upstream.status.ready)
    task = asyncio.create_task(upstream.poll_health(interval=0.05))
    try:
        await wait_until(lambda: upstream.status.ready, "the first answered poll", within=5)
        fake.switches.health_hang = True  # every poll from here on times out
        first_unanswered = len(ready_at)
        await wait_until(lambda: not upstream.status.ready, "the backend seen unreachable", within=10)
        assert upstream.status.state == "unreachable"
        # one more poll, to read what the gateway believed after each unanswered one
        await wait_until(lambda: len(ready_at) > first_unanswered + MISSES + 1, "a poll", within=10)
        # MISSES unanswered polls left it ready, the one after them did not
        assert ready_at[first_unanswered:first_unanswered + MISSES + 2] == \
            [True] * (MISSES + 1) + [False]

        fake.switches.health_hang = False
        fake.release.set()  # and any poll still hanging is answered
        await wait_until(lambda: upstream.status.ready, "an answered poll", within=5)
        assert upstream.status.state == "ready"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await upstream.close()
