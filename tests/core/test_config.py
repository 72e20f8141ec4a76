from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, setting_names
from core.platform import Platform

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_earlier_gateways() -> None:
    config = load_config({"PLATFORM": "bare-metal"})
    assert (config.port, config.port_health, config.port_backend) == (8000, 8001, 8080)
    assert config.auth_enabled is True
    assert config.data_dir == Path("data")
    assert config.auth_keys_file == Path("data/keys.json")
    assert config.models_dir == Path("data/models")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"PORT": "http", "CTX": "-5", "AUTH_ENABLED": "maybe", "CORS_ORIGINS": "ftp://x"})
    text = str(info.value)
    for name in ("PORT='http'", "CTX='-5'", "AUTH_ENABLED='maybe'", "CORS_ORIGINS='ftp://x'"):
        assert name in text
    assert len(info.value.problems) == 4


def test_trusted_proxies_are_addresses_networks_or_star() -> None:
    config = load_config({"TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1,::1"})
    assert config.trusted_proxies == ("10.0.0.0/8", "127.0.0.1", "::1")
    assert load_config({"TRUSTED_PROXIES": "*"}).trusted_proxies == ("*",)
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES='10.0.0.0/8, lb.internal'"):
        load_config({"TRUSTED_PROXIES": "10.0.0.0/8, lb.internal"})


def test_extra_args_are_shell_split() -> None:
    config = load_config({"EXTRA_ARGS": "--flash-attn on --chat-template 'chat ml'"})
    assert config.extra_args == ("--flash-attn", "on", "--chat-template", "chat ml")


def test_same_port_twice_is_one_listener() -> None:
    # RunPod's default: serve then answers the probes on the gateway's port
    config = load_config({"PORT": "9000", "PORT_HEALTH": "9000"})
    assert config.port == config.port_health == 9000


@pytest.mark.parametrize(("platform", "data_dir"), [
    ("runpod-serverless", "/runpod-volume"), ("runpod-pod", "/workspace"), ("vastai", "/workspace"),
    ("lambda", "/data"), ("docker", "/data"), ("bare-metal", "data")])
def test_data_dir_follows_the_platform(platform: str, data_dir: str) -> None:
    config = load_config({"PLATFORM": platform})
    assert config.platform == Platform(platform)
    assert config.data_dir == Path(data_dir)
    assert load_config({"PLATFORM": platform, "DATA_DIR": "/x"}).data_dir == Path("/x")


def _documented(path: Path, pattern: str) -> set[str]:
    return set(re.findall(pattern, path.read_text(), flags=re.MULTILINE))


def test_env_example_lists_exactly_the_settings() -> None:
    names = set(setting_names())
    listed = _documented(ROOT / ".env.example", r"^([A-Z][A-Z0-9_]+)=")
    assert listed == names, (f"missing from .env.example: {sorted(names - listed)}; "
                             f"unknown there: {sorted(listed - names)}")


def test_configuration_doc_lists_exactly_the_settings() -> None:
    names = set(setting_names())
    listed = _documented(ROOT / "docs" / "configuration.md", r"^\| `([A-Z][A-Z0-9_]+)` \|")
    assert listed == names, (f"missing from docs/configuration.md: {sorted(names - listed)}; "
                             f"unknown there: {sorted(listed - names)}")
