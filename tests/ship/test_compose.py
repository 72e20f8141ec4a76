"""docker-compose.yml and the Prometheus and Grafana files it mounts, read without Docker:
services and profiles, the gateway's ports, environment and volumes against the configuration
object, and the monitoring wiring (scrape target, key file, datasource, dashboards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.config import load_config, setting_names
from tests.ship.dockerignore import DockerIgnore
from tests.ship.project import (
    COMPOSE,
    DASHBOARD,
    DOCKERFILES,
    GRAFANA,
    NON_SETTINGS,
    PROMETHEUS,
    ROOT,
    compose,
    dockerfile,
    env_example,
    interpolate,
    seconds,
    yaml_file,
)

DEFAULTS = load_config({})
GATEWAYS = {"gateway-gpu": "cuda", "gateway-cpu": "cpu"}


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path → source (host path or volume name) of short-syntax volumes."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target, *_ = interpolate(spec).split(":")
        out[target] = source
    return out


def host_path(source: str) -> Path:
    return (COMPOSE.parent / source).resolve()


def test_services_and_profiles() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway-gpu", "gateway-cpu", "prometheus", "grafana", "redis"}
    assert service("gateway-gpu")["profiles"] == ["gpu"]
    assert service("gateway-cpu")["profiles"] == ["cpu"]
    assert service("redis")["profiles"] == ["fleet"]
    [device] = service("gateway-gpu")["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in service("gateway-cpu")


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateway_builds_the_tested_dockerfile(name: str) -> None:
    build = service(name)["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILES[GATEWAYS[name]]


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateway_ports_are_the_configured_ones(name: str) -> None:
    targets = {int(interpolate(p).rsplit(":", 1)[1]) for p in service(name)["ports"]}
    assert targets == {DEFAULTS.port, DEFAULTS.port_health}


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateway_environment_is_made_of_settings_that_parse(name: str) -> None:
    env = {k: interpolate(str(v)) for k, v in service(name)["environment"].items()}
    unknown = set(env) - set(setting_names()) - NON_SETTINGS
    assert not unknown, f"compose sets variables that are not settings: {unknown}"
    assert set(env) <= set(env_example())
    image_env = {k: v for k, v in dockerfile(GATEWAYS[name]).final.env().items() if k in setting_names()}
    config = load_config({**image_env, **env})
    assert str(config.models_dir) in mounts(service(name)), "MODELS_DIR must be a mounted folder"


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateway_data_dir_is_a_named_volume(name: str) -> None:
    data_dir = dockerfile(GATEWAYS[name]).final.env()["DATA_DIR"]
    source = mounts(service(name))[data_dir]
    assert source in compose()["volumes"], "keys and usage must outlive the container"


def test_redis_keeps_its_data_on_a_volume_and_is_not_published() -> None:
    redis = service("redis")
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"] in compose()["volumes"], "the append-only file outlives the container"
    assert "ports" not in redis, "no password: only the compose network reaches it"


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateway_uses_redis_only_when_redis_url_is_set(name: str) -> None:
    env = service(name)["environment"]
    assert env["REDIS_URL"] == "${REDIS_URL:-}"
    assert load_config({"REDIS_URL": interpolate(env["REDIS_URL"])}).redis_url is None


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_stop_grace_covers_the_drain(name: str) -> None:
    # serve drains the gateway (SHUTDOWN_GRACE_SECONDS), stops llama-server (BACKEND_STOP_GRACE)
    # and then the health process (5 s); Docker sends SIGKILL when stop_grace_period runs out
    needed = DEFAULTS.shutdown_grace_seconds + DEFAULTS.backend_stop_grace + 5
    assert seconds(service(name)["stop_grace_period"]) >= needed


def scrape_job() -> dict[str, Any]:
    [job] = yaml_file(PROMETHEUS)["scrape_configs"]
    assert isinstance(job, dict)
    return job


def test_prometheus_scrapes_the_gateway_port_with_a_bearer_key_file() -> None:
    job = scrape_job()
    [[target]] = [sc["targets"] for sc in job["static_configs"]]
    host, port = target.rsplit(":", 1)
    assert int(port) == DEFAULTS.port
    for name in GATEWAYS:
        assert host in service(name)["networks"]["default"]["aliases"]
    assert job["metrics_path"] == "/metrics"
    auth = job["authorization"]
    assert auth["type"] == "Bearer" and "credentials" not in auth
    key_file = Path(auth["credentials_file"])
    prom_mounts = mounts(service("prometheus"))
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./docker/prometheus/prometheus.yml"
    [source] = [src for dst, src in prom_mounts.items() if key_file.is_relative_to(dst)]
    secrets = host_path(source)
    assert secrets.is_dir(), "the key's folder exists in the repository (its contents do not)"
    assert (secrets / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    assert DockerIgnore.read(ROOT / ".dockerignore").excluded(
        str((secrets / key_file.name).relative_to(ROOT)))


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard() -> None:
    graf_mounts = mounts(service("grafana"))
    assert host_path(graf_mounts["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"
    [datasource] = yaml_file(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and "prometheus" in compose()["services"]
    assert f":{url.port}" in service("prometheus")["ports"][0]
    [provider] = yaml_file(GRAFANA / "provisioning" / "dashboards" / "llamagate.yml")["providers"]
    dashboards_dir = provider["options"]["path"]
    assert host_path(graf_mounts[dashboards_dir]) == DASHBOARD.parent
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells

