from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.keytool import KeyTool

from .support import HubThread


@pytest.fixture(scope="module")
def keytool(tmp_path_factory: pytest.TempPathFactory) -> KeyTool:
    """A key store in the data dir of the module's service (the service runs with
    DATA_DIR = <this dir>/data)."""
    data = tmp_path_factory.mktemp("serving") / "data"
    return KeyTool(data / "keys.json", data / "usage.db")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubThread]:
    thread = HubThread(tmp_path_factory.mktemp("hub"))
    thread.start()
    try:
        yield thread
    finally:
        thread.close()
