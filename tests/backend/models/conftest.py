from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .fakehub import FakeHub


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[FakeHub]:
    fake = FakeHub(tmp_path / "hub")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
