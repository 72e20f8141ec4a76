"""The deployment files under test, read once per test session."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.ship.dockerfile import Dockerfile, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cuda": ROOT / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llamagate.json"

# Environment variables the images or the service set that are not llamagate settings; each is
# explained in docs/deployment.md (a test checks).
NON_SETTINGS = frozenset({"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
                          "PROMETHEUS_MULTIPROC_DIR",
                          "LLAMAGATE_NATIVE"})  # read at import by gateway/native.py


@cache
def dockerfile(kind: str) -> Dockerfile:
    return parse(DOCKERFILES[kind].read_text())


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def yaml_file(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@cache
def env_example() -> dict[str, str]:
    """NAME → default value as listed in .env.example."""
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` / `${NAME-default}` / `${NAME}` with nothing set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def seconds(duration: str) -> float:
    """Docker/compose durations: 90s, 1m30s, 5m, 1h."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)
