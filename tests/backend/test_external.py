from __future__ import annotations

import pytest

from backend.external import health_state


@pytest.mark.parametrize(("status", "expected"), [
    (200, ("ready", True)), (404, ("ready", True)), (503, ("starting", False)),
    (500, ("error", False)), (None, ("unreachable", False))])
def test_health_state(status: int | None, expected: tuple[str, bool]) -> None:
    assert health_state(status) == expected
