"""The `run` fixture of the edge server's tests."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tests.gateway.edge.support import Run, Scenario, started_edge


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """`run(scenario)`: the scenario against a fresh edge server, on a new loop of the
    parameter's kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            async with started_edge() as edge:
                await scenario(edge)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    return run
