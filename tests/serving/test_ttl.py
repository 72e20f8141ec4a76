"""MODEL_TTL_SECONDS: a loaded model nobody uses is unloaded by the serve process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from tests.support.service import Service
from tests.support.wait import wait_for

from .support import chat, health_states, write_models

pytestmark = pytest.mark.llama_server  # every test here runs the real binary

TTL = 2


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("ttl")
    write_models(tmp / "models", "alpha", "beta")
    service = Service(tmp, {"AUTH_ENABLED": "false", "MODELS_DIR": str(tmp / "models"),
                            "MODEL_TTL_SECONDS": str(TTL),
                            # room for one long generation (the last test)
                            "CTX": "8192", "PARALLEL": "1"})
    with service.running():
        yield service


def test_an_idle_model_is_unloaded_after_the_ttl(svc: Service) -> None:
    assert health_states(svc) == {"alpha": "unloaded", "beta": "unloaded"}
    assert chat(svc, "beta").status_code == 200
    last_use = time.time()
    wait_for(lambda: health_states(svc)["beta"] == "loaded", "beta to be loaded", within=10)
    wait_for(lambda: health_states(svc)["beta"] == "unloaded", "beta to be unloaded by the TTL", within=20)
    # not before the TTL ran out (the serve process notices within its 0.25 s poll)
    assert time.time() - last_use >= TTL
    assert health_states(svc)["alpha"] == "unloaded"  # never loaded, nothing to unload


def test_use_keeps_a_model_loaded(svc: Service) -> None:
    """Last use reaches the serve process through the gateway workers' heartbeats: a model
    asked for more often than the TTL stays loaded well past the TTL since it loaded."""
    assert chat(svc, "alpha").status_code == 200
    wait_for(lambda: health_states(svc)["alpha"] == "loaded", "alpha to be loaded", within=10)
    started = time.monotonic()
    while time.monotonic() - started < 2.5 * TTL:
        time.sleep(0.4)  # pacing between requests, not synchronisation
        assert health_states(svc)["alpha"] == "loaded"
        assert chat(svc, "alpha").status_code == 200
    wait_for(lambda: health_states(svc)["alpha"] == "unloaded", "alpha to be unloaded once idle", within=20)


def test_a_long_request_is_use_not_idleness(svc: Service) -> None:
    """Last use is when a request started; a generation running longer than the TTL must
    not have its model unloaded under it (the stream would just stop)."""
    wait_for(lambda: health_states(svc)["beta"] == "unloaded", "beta to be idle", within=20)
    started = time.monotonic()
    outlived_ttl = False
    with requests.post(f"{svc.url}/v1/completions", stream=True, timeout=60,
                       json={"model": "beta", "prompt": "Once upon a time", "max_tokens": 8000,
                             "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            assert line.startswith(b"data: {") or not line, line  # never [DONE] this early
            if time.monotonic() - started > TTL + 1.5:
                outlived_ttl = True
                assert health_states(svc)["beta"] == "loaded"
                break  # proven; leaving cancels the rest of the generation
    assert outlived_ttl, f"the stream ended after {time.monotonic() - started:.1f}s"
    wait_for(lambda: health_states(svc)["beta"] == "unloaded", "beta to be unloaded once idle", within=20)
