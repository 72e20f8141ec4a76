"""A full queue tells refused clients when to come back (issue 22): Retry-After is the
queue's drain time at the pace llama-server is measured to finish requests, with a jitter,
so clients refused together do not all return into a queue that is still full. Before, it
was always 1: in the fault campaign 44 clients retried in lockstep and all 132 retries
failed. Real `llamagate serve`, real llama-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.service import Service

pytestmark = pytest.mark.llama_server

CLIENTS = 10
ATTEMPTS = 4
# ~0.3 s of generation each on the 1-thread tiny model (it makes about 4,000 tokens a second)
BODY = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 1200, "ignore_eos": True}


async def _client(http: aiohttp.ClientSession, url: str, waits: list[int]) -> bool:
    """Post until answered, each time waiting as long as Retry-After says (the client's
    behaviour under test, as the OpenAI SDK's retries do); True once answered 200."""
    for _ in range(ATTEMPTS):
        async with http.post(url, json=BODY) as r:
            await r.read()
            if r.status == 200:
                return True
            assert r.status == 429, r.status
            wait = int(r.headers["Retry-After"])
            waits.append(wait)
        await asyncio.sleep(wait)
    return False


def test_clients_that_follow_retry_after_get_through_a_full_queue(
        tmp_path: Path, tiny_model: Path) -> None:
    svc = Service(tmp_path, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                             "AUTH_ENABLED": "false", "MAX_CONCURRENT_REQUESTS": "1",
                             "MAX_QUEUE_SIZE": "2", "CTX": "2048"})

    async def flood() -> tuple[list[bool], list[int]]:
        waits: list[int] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            url = svc.url + "/v1/completions"
            done = await asyncio.gather(*(_client(http, url, waits) for _ in range(CLIENTS)))
        return list(done), waits

    with svc.running():
        answered, waits = asyncio.run(flood())
    assert waits, "the queue never filled: nothing was refused"
    assert all(1 <= w <= 60 for w in waits)
    # spread over the drain time, not one instant for every client
    assert len(set(waits)) > 1, waits
    assert all(answered), f"{answered.count(False)} clients never got through: waits {waits}"
