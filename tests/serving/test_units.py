"""No service: the router preset and /models parsing, the fleet's cooldown rules on an
injected clock, the gateway's routing around a cooling model, and the merged exposition."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.models.overrides import OverrideStore
from backend.models.registry import ModelRegistry
from backend.router import RoutedModel, RouterClient, RouterStatus, args_to_options, parse_models, preset_text
from core.config import load_config
from gateway.admin.catalog import ModelCatalog
from gateway.errors import BackendUnavailable
from gateway.observe.metrics import label_backend_metrics
from gateway.observe.model_metrics import merge_expositions
from llamagate.fleet import Fleet, FleetError, merge_last_used
from tests.support.metrics import promtool_check
from tests.support.wait import wait_until

# --- backend/router.py ---------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["--flash-attn", "on", "--jinja"], [("flash-attn", "on"), ("jinja", "true")]),
    # negated flags keep their own name: llama-server inverts a negated key itself, and
    # `--no-host` has no positive form (`host = false` would set the listen address)
    (["--no-mmap"], [("no-mmap", "true")]),
    (["--no-host", "--jinja"], [("no-host", "true"), ("jinja", "true")]),
    (["--temp=0.5", "--chat-template=chatml"], [("temp", "0.5"), ("chat-template", "chatml")]),
    (["--n-gpu-layers", "-1"], [("n-gpu-layers", "-1")]),
    (["--rope-freq-scale", "-0.5", "--x", "-.25", "--y", "-1e3"],
     [("rope-freq-scale", "-0.5"), ("x", "-.25"), ("y", "-1e3")]),
    # a short option after a flag is the next option, not the flag's value
    (["--jinja", "-fa", "on", "-ngl", "-1"], [("jinja", "true"), ("fa", "on"), ("ngl", "-1")]),
    (["--override-kv", "a=int:1"], [("override-kv", "a=int:1")]),
    ([], []),
])
def test_args_to_options(args: list[str], expected: list[tuple[str, str]]) -> None:
    assert args_to_options(args) == expected


@pytest.mark.parametrize("args", [["chatml"], ["--jinja", "on", "off"], ["-1"], ["--"],
                                  ["--chat-template", "a\nb"], ["--x=a\rb"]])
def test_args_to_options_refuses(args: list[str]) -> None:
    with pytest.raises(ValueError):
        args_to_options(args)


def test_preset_text(tmp_path: Path) -> None:
    models = [
        RoutedModel("chat", tmp_path / "a.gguf", ctx=4096, ngl=-1, parallel=2,
                    extra_args=("--no-mmap", "--temp", "0.7")),
        RoutedModel("small", tmp_path / "b.gguf"),
    ]
    text = preset_text(models, [("threads", "1"), ("jinja", "true")])
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        elif line and not line.startswith(";"):
            assert current is not None, line
            sections[current].append(line)
    assert list(sections) == ["*", "chat", "small"]
    assert sections["*"] == ["threads = 1", "jinja = true"]
    assert sections["chat"] == [f"model = {tmp_path / 'a.gguf'}", "ctx-size = 4096",
                                "n-gpu-layers = -1", "parallel = 2", "no-mmap = true", "temp = 0.7"]
    assert sections["small"] == [f"model = {tmp_path / 'b.gguf'}"]
    assert text.endswith("\n")


@pytest.mark.parametrize("name", ["", "a]b", "a=b", "semi;colon", "line\nbreak"])
def test_preset_refuses_bad_section_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        preset_text([RoutedModel(name, tmp_path / "a.gguf")], [])


def test_preset_refuses_line_breaks_in_paths_and_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        preset_text([RoutedModel("a", tmp_path / "x\ny.gguf")], [])
    with pytest.raises(ValueError):
        preset_text([RoutedModel("a", tmp_path / "a.gguf")], [("alias", "x\ny")])


def test_parse_models() -> None:
    listing = {"object": "list", "data": [
        {"id": "a", "status": {"value": "loaded", "args": ["llama-server"]}},
        {"id": "b", "status": {"value": "unloaded"}},
        # a failed load: the router reports it unloaded, with failed and the exit code
        {"id": "c", "status": {"value": "unloaded", "exit_code": 1, "failed": True}},
        {"id": "d", "status": {"value": "loading"}},
        {"id": "e"},  # no status at all
        {"id": 7, "status": {"value": "loaded"}},  # not a name: skipped
        "junk",
    ]}
    assert parse_models(listing) == {
        "a": RouterStatus("loaded"), "b": RouterStatus("unloaded"),
        "c": RouterStatus("failed", 1), "d": RouterStatus("loading"), "e": RouterStatus("unknown"),
    }
    assert parse_models({"data": "nope"}) == {}
    assert parse_models(["not", "a", "dict"]) == {}
    assert parse_models({"data": [{"id": "x", "status": "weird"}]}) == {"x": RouterStatus("unknown")}


# --- llamagate/fleet.py --------------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_fleet(tmp_path: Path, tiny_model: Path, **env: str) -> tuple[Fleet, Clock]:
    """A fleet serving one registry model, "m", on a clock the test moves."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "m.gguf")
    registry = ModelRegistry(models, OverrideStore(tmp_path / "overrides.json"))
    registry.scan()
    config = load_config({"MODEL_COOLDOWN_SECONDS": "10", "DATA_DIR": str(tmp_path), **env})
    clock = Clock(1000.0)
    fleet = Fleet(config, registry, tmp_path / "models.ini", [("threads", "1")], clock=clock)
    fleet.configure(None)
    return fleet, clock


@pytest.fixture
def fleet(tmp_path: Path, tiny_model: Path) -> tuple[Fleet, Clock]:
    return make_fleet(tmp_path, tiny_model)


def no_detail(name: str) -> str | None:
    return None


FAILED = {"m": RouterStatus("failed", 1)}


def test_fleet_cooldown_rules(fleet: tuple[Fleet, Clock]) -> None:
    f, clock = fleet
    assert f.states["m"].state == "unloaded"
    assert "[m]" in f.preset_path.read_text()

    # a failed load starts a cooldown, with the exit code and the log line as the reason
    assert f.observe(FAILED, {}, lambda name: f"E load: {name} is broken") is True
    st = f.states["m"]
    assert (st.state, st.failures, st.cooldown_until) == ("cooldown", 1, 1010.0)
    assert st.reason is not None and "code 1" in st.reason and "m is broken" in st.reason
    published = f.published()["m"]
    assert published["state"] == "cooldown" and published["retry_in"] == 10.0
    assert published["cooldown_until"] == 1010.0

    # still failed during the cooldown, even with a request seen: no new cooldown
    clock.now = 1005.0
    assert f.observe(FAILED, {"m": 1004.0}, no_detail) is False
    assert (st.state, st.failures, st.cooldown_until) == ("cooldown", 1, 1010.0)
    assert f.published()["m"]["retry_in"] == 5.0

    # the cooldown ends: the model is failed, open to a retry, and not cooling down again
    clock.now = 1011.0
    assert f.observe(FAILED, {"m": 1004.0}, no_detail) is True
    assert (st.state, st.failures, st.cooldown_until) == ("failed", 1, 1010.0)
    assert f.published()["m"]["cooldown_until"] is None
    clock.now = 1020.0
    assert f.observe(FAILED, {"m": 1004.0}, no_detail) is False  # the last use predates expiry
    assert st.state == "failed" and st.failures == 1

    # a request after the expiry retried the load, and it failed again: a new cooldown
    clock.now = 1021.0
    assert f.observe(FAILED, {"m": 1020.5}, no_detail) is True
    assert (st.state, st.failures, st.cooldown_until) == ("cooldown", 2, 1031.0)

    # loaded resets everything
    clock.now = 1040.0
    assert f.observe({"m": RouterStatus("loaded")}, {}, no_detail) is True
    assert (st.state, st.failures, st.cooldown_until) == ("loaded", 0, 0.0)
    assert f.published()["m"]["reason"] is None
    assert st.loaded_since == 1040.0
    clock.now = 1041.0
    assert f.observe({"m": RouterStatus("loaded")}, {}, no_detail) is False
    assert st.loaded_since == 1040.0  # since it became loaded, not since the last reading


def test_fleet_retry_seen_loading_then_failed(fleet: tuple[Fleet, Clock]) -> None:
    f, clock = fleet
    f.observe(FAILED, {}, no_detail)
    clock.now = 1011.0
    f.observe(FAILED, {}, no_detail)
    clock.now = 1012.0
    f.observe({"m": RouterStatus("loading")}, {"m": 1011.5}, no_detail)
    assert f.states["m"].state == "loading"
    clock.now = 1012.3
    f.observe(FAILED, {"m": 1011.5}, no_detail)
    assert (f.states["m"].state, f.states["m"].failures) == ("cooldown", 2)


def test_fleet_model_missing_from_router_reads_unloaded(fleet: tuple[Fleet, Clock]) -> None:
    f, _ = fleet
    f.observe({"m": RouterStatus("loaded")}, {}, no_detail)
    assert f.observe({}, {}, no_detail) is True
    assert f.states["m"].state == "unloaded"


def test_fleet_refuses_extra_args_the_preset_cannot_hold(fleet: tuple[Fleet, Clock]) -> None:
    f, _ = fleet
    before = f.preset_path.read_text()
    f.registry.update("m", {"extra_args": ["chatml"]})
    with pytest.raises(FleetError) as caught:
        f.configure(None)
    assert caught.value.http_status == 400 and "chatml" in str(caught.value)
    assert f.preset_path.read_text() == before


class UnreachableRouter:
    """Reports "m" loaded; every load and unload fails as a router mid-restart does."""

    def __init__(self) -> None:
        self.loads = self.unloads = 0

    async def models(self, reload: bool = False) -> dict[str, RouterStatus]:
        return {"m": RouterStatus("loaded")}

    async def busy(self, name: str) -> bool:
        return False

    async def load(self, name: str) -> None:
        self.loads += 1
        raise aiohttp.ClientConnectionError("connection refused")

    async def unload(self, name: str) -> None:
        self.unloads += 1
        raise aiohttp.ClientConnectionError("connection refused")


async def test_fleet_watch_survives_router_errors(tmp_path: Path, tiny_model: Path) -> None:
    f, clock = make_fleet(tmp_path, tiny_model, MODEL_TTL_SECONDS="5")
    f.models["m"] = replace(f.models["m"], preload=True)
    router = UnreachableRouter()
    changes: list[str] = []
    f.on_change = lambda: changes.append(f.states["m"].state)
    task = asyncio.create_task(f.watch(cast(RouterClient, router), no_detail))
    try:
        await wait_until(lambda: changes == ["loaded"], "the first reading", within=15)
        clock.now += 6  # idle past the TTL: each poll tries to unload, and fails
        await wait_until(lambda: router.unloads >= 2, "a second unload attempt, a poll later", within=15)
        assert router.loads == 1 and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_merge_last_used() -> None:
    workers: list[dict[str, Any]] = [
        {"models_used": {"a": 5.0, "b": 9.0}}, {"models_used": {"a": 7.0, "c": "x"}}, {"pid": 3}]
    assert merge_last_used(workers) == {"a": 7.0, "b": 9.0}


# --- gateway/admin/catalog.py ----------------------------------------------------------------

def test_catalog_routes_around_a_cooling_model() -> None:
    catalog = ModelCatalog(("a", "b", "c"), "a", "router")
    now = time.time()
    catalog.update({"models": ["a", "b", "c"], "mode": "router", "model_states": {
        "a": {"state": "cooldown", "fallback": "b", "retry_in": 60.0, "cooldown_until": now + 60},
        "b": {"state": "loaded", "fallback": None},
        # published 50 s ago: retry_in is stale, the absolute end is not
        "c": {"state": "cooldown", "fallback": None, "retry_in": 60.0, "cooldown_until": now + 9.5},
    }})
    assert catalog.resolve("zzz") is None
    assert catalog.route("b") == "b"
    assert catalog.route("a") == "b"
    assert "b" in catalog.used and "a" not in catalog.used
    # a key that may not use the fallback is not moved to it: the fallback never widens access
    with pytest.raises(BackendUnavailable):
        catalog.route("a", allowed=lambda m: m == "a")
    with pytest.raises(BackendUnavailable) as caught:
        catalog.route("c")
    assert caught.value.code == "model_unavailable"
    assert caught.value.retry_after == 10
    # a fallback that is itself cooling down is no fallback
    catalog.states["b"] = {"state": "cooldown", "fallback": None, "cooldown_until": now + 3}
    with pytest.raises(BackendUnavailable):
        catalog.route("a")
    assert [m["id"] for m in catalog.listing()["data"]] == ["a", "b", "c"]


# --- gateway/observe/model_metrics.py --------------------------------------------------------

LLAMACPP = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {p}
# HELP llamacpp:n_tokens_max Largest observed n_tokens.
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 20
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""


def reordered(text: str) -> str:
    """The same families, the last one first (samples must still land in their family)."""
    lines = text.splitlines()
    return "\n".join(lines[6:] + lines[:6]) + "\n"


def test_merge_expositions() -> None:
    texts = [label_backend_metrics(LLAMACPP.format(p=12), "alpha"),
             label_backend_metrics(reordered(LLAMACPP.format(p=30)), "beta")]
    merged = merge_expositions(texts)
    lines = merged.splitlines()
    for family in ("llamacpp_prompt_tokens_total", "llamacpp_n_tokens_max",
                   "llamacpp_requests_processing"):
        assert sum(line.startswith(f"# HELP {family} ") for line in lines) == 1
        assert sum(line.startswith(f"# TYPE {family} ") for line in lines) == 1
    # each family's comments come first, then all of its samples, before the next family
    type_at = lines.index("# TYPE llamacpp_requests_processing gauge")
    samples = [i for i, line in enumerate(lines) if line.startswith("llamacpp_requests_processing{")]
    assert len(samples) == 2 and all(i > type_at for i in samples)
    assert samples == list(range(type_at + 1, type_at + 3))
    parsed = {f.name: {s.labels["model"]: s.value for s in f.samples}
              for f in text_string_to_metric_families(merged)}
    assert parsed["llamacpp_prompt_tokens"] == {"alpha": 12.0, "beta": 30.0}
    assert parsed["llamacpp_requests_processing"] == {"alpha": 0.0, "beta": 0.0}
    assert merge_expositions([]) == ""
    assert merge_expositions(["", "\n"]) == ""


def test_merged_exposition_passes_promtool() -> None:
    merged = merge_expositions([label_backend_metrics(LLAMACPP.format(p=1), "alpha"),
                                label_backend_metrics(LLAMACPP.format(p=2), "beta")])
    promtool_check(merged)  # skips without promtool (fails in CI)
    # and the check is not vacuous: the naive concatenation declares each family twice
    naive = "".join(label_backend_metrics(LLAMACPP.format(p=n), m) for n, m in ((1, "a"), (2, "b")))
    with pytest.raises(AssertionError, match="second HELP line"):
        promtool_check(naive)
