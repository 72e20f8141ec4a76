from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamagate.tiny_model import write_model
from tests.support.service import Service


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Service]:
    """One running service (auth off) shared by a test module."""
    tmp = tmp_path_factory.mktemp("service")
    svc = Service(tmp, {"MODEL_PATH": str(tiny_model), "MODEL_NAME": "tiny",
                        "AUTH_ENABLED": "false"})
    with svc.running():
        yield svc
