"""Metric names in PromQL expressions and in a Prometheus text exposition."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'")
_NAME = re.compile(r"(?<![A-Za-z0-9_:])(llamagate_[a-z_]+|llamacpp_[a-z_]+)")

# the series names Prometheus stores for one family of each type
_SERIES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}


def queried_names(expr: str) -> set[str]:
    """Series names an expression selects (label values in quotes are not names)."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape of `text` gives Prometheus, including families that have no
    sample yet (a labelled counter nobody incremented still declares its `_total` series)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        for suffix in _SERIES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names
