"""Helpers for the multi-model serving tests: models on disk, HTTP calls, the fake Hub
served from a background thread (the services under test are separate processes)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import requests
from gguf import GGUFWriter

from llamagate.tiny_model import write_model
from tests.backend.models.fakehub import FakeHub
from tests.support.keytool import KeyTool
from tests.support.service import Service
from tests.support.wait import wait_for

PROMPT = [{"role": "user", "content": "Tell me about the weather"}]


def write_models(models_dir: Path, *names: str) -> dict[str, Path]:
    """Tiny random llama models, one seed per name (so each answers differently)."""
    return {name: write_model(models_dir / f"{name}.gguf", seed=i + 1) for i, name in enumerate(names)}


def write_broken_model(path: Path) -> Path:
    """A GGUF the registry reads as `ok` (complete header and tensor data) that llama-server
    refuses to load: its architecture does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "notarealarch")
    writer.add_name("broken")
    writer.add_tensor("x.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bearer(secret: str | None) -> dict[str, str]:
    return {} if secret is None else {"Authorization": f"Bearer {secret}"}


def chat(svc: Service, model: str, secret: str | None = None, **extra: Any) -> requests.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    return requests.post(f"{svc.url}/v1/chat/completions", json=body, headers=bearer(secret),
                         timeout=60)


def admin(svc: Service, method: str, path: str, secret: str, body: Any = None) -> requests.Response:
    return requests.request(method, f"{svc.url}{path}", json=body, headers=bearer(secret), timeout=60)


def serving_states(svc: Service, secret: str) -> dict[str, dict[str, Any]]:
    """Served name → serving state, from GET /admin/models."""
    r = admin(svc, "GET", "/admin/models", secret)
    assert r.status_code == 200, r.text
    return {s["name"]: s for entry in r.json()["data"] for s in entry["serving"]}


def health_states(svc: Service) -> dict[str, str]:
    return {name: st["state"] for name, st in svc.health()["model_states"].items()}


def wait_state(svc: Service, secret: str, model: str, state: str, timeout: float = 30) -> dict[str, Any]:
    """Poll /admin/models until `model` reaches `state`; returns its serving entry."""
    def reached() -> dict[str, Any] | None:
        entry = serving_states(svc, secret).get(model)
        return entry if entry is not None and entry["state"] == state else None
    found: dict[str, Any] = wait_for(reached, f"{model} to be {state}", within=timeout)
    return found


def v1_model_ids(svc: Service, secret: str | None = None) -> list[str]:
    r = requests.get(f"{svc.url}/v1/models", headers=bearer(secret), timeout=10)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def auth_env(keys: KeyTool) -> dict[str, str]:
    return {"AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys.keys_file),
            "USAGE_DB": str(keys.usage_db), "KEYS_RELOAD_INTERVAL": "0",
            "AUTH_FAILURES_PER_MINUTE": "1000"}


def service_dir(keys: KeyTool) -> Path:
    """The directory whose data/ holds the key store: Service(tmp=...) uses tmp/data."""
    return keys.keys_file.parent.parent


class HubThread:
    """A FakeHub on its own event loop in a daemon thread, for tests that drive a service
    subprocess synchronously. ``hub.switches`` may be changed from the test thread."""

    def __init__(self, root: Path) -> None:
        self.hub = FakeHub(root)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fakehub", daemon=True)

    def start(self) -> FakeHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.hub.start(), self._loop).result(10)
        return self.hub

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.hub.close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
