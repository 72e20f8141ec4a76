"""The `run` fixture of the edge server's tests."""

from __future__ import annotations

import functools

import pytest

from tests.gateway.edge.support import Run, run_on


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """`run(scenario)`: the scenario against a fresh edge server, on a new loop of the
    parameter's kind."""
    return functools.partial(run_on, request.param)
