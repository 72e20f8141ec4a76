"""Per-model metrics in multi-model mode: each model's state, and llama-server's own
`llamacpp:*` metrics scraped from every loaded model and merged into one exposition."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.admin.catalog import ModelCatalog

STATES = ("unloaded", "loading", "loaded", "sleeping", "failed", "cooldown")


class ModelStateCollector(Collector):
    """llamagate_model_state{model,state}: 1 for each model's current state, 0 for the others."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self._catalog = catalog

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("llamagate_model_state",
                                   "Served model state (multi-model mode), one series per state",
                                   labels=["model", "state"])
        for name in self._catalog.names:
            current = self._catalog.states.get(name, {}).get("state")
            if current is None:
                continue
            for state in STATES:
                family.add_metric([name, state], 1.0 if state == current else 0.0)
        yield family


def merge_expositions(texts: Iterable[str]) -> str:
    """Several labelled llamacpp:* expositions as one: each family's HELP/TYPE once, then
    every model's samples (promtool rejects a family declared twice)."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    current: tuple[list[str], list[str]] | None = None
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    current = families.setdefault(parts[2], ([], []))
                    if line not in current[0]:
                        current[0].append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            family = families.get(name) or current or families.setdefault(name, ([], []))
            family[1].append(line)
    out = [line for comments, samples in families.values() for line in (*comments, *samples)]
    return "\n".join(out) + "\n" if out else ""
