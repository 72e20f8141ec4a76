"""Fixtures for the upstream tests: ``run`` (a scenario against the fake llama-server, on
asyncio and on uvloop), a scripted backend (scripted.py) and a gateway in front of it; the
fake upstream and its gateway come from tests/conftest.py and tests/gateway/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from tests.gateway.upstream.scripted import Scripted
from tests.support.fake_llama import FakeLlama
from tests.support.gateway import Gateway, serve_gateway

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Scenario = Callable[[FakeLlama], Awaitable[None]]


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    backend = await Scripted().start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def scripted_gateway(scripted: Scripted, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with serve_gateway(scripted.url, {"DATA_DIR": str(tmp_path / "data")}) as gateway:
        yield gateway


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Scenario], None]]:
    """`run(scenario)`: the scenario, on a fresh loop of the parameter's kind, with a
    fake backend started on that loop."""
    def run(scenario: Scenario) -> None:
        async def main() -> None:
            fake = FakeLlama()
            await fake.start()
            try:
                await scenario(fake)
            finally:
                await fake.close()
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(main())
    yield run
