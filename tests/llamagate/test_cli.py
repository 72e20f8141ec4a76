"""The `llamagate` command line: --help for every command (and `serve --help` listing every
setting without starting anything), flags over the environment, the unknown-flag message,
--version. Commands run as `python -m llamagate.cli`, as the console script runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from core.config import setting_names, settings
from llamagate import serve_flags
from llamagate.setting_help import SECTIONS
from tests.support.fake_llama import FakeLlama
from tests.support.service import ROOT, Service, free_port, llama_server


def llamagate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # a serve that started anyway would outlive the timeout: the test then fails on it
    return subprocess.run([sys.executable, "-m", "llamagate.cli", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("command", [[], ["serve"], ["keys"], ["keys", "generate"], ["pull"],
                                     ["make-test-model"]])
def test_every_command_has_help(command: list[str]) -> None:
    done = llamagate(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout
    assert done.stderr == ""


def test_serve_help_prints_help_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    done = llamagate("serve", "--help", env={"PORT": str(port), "DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 0
    assert done.stdout.startswith("usage: llamagate serve")
    assert not (tmp_path / "data").exists()  # serve would have made it


def test_serve_help_lists_every_setting_with_its_variable_and_default() -> None:
    text = " ".join(serve_flags.parser().format_help().split())  # unwrapped
    for setting in settings():
        assert setting.name in text
        if setting.secret:
            assert setting.flag not in text  # environment only
            continue
        assert setting.flag in text
        assert f"[{setting.name}; default {serve_flags._shown(setting.default)}" in text
    assert "--port N gateway (OpenAI API) [PORT; default 8000; an integer from 0 to 65535]" in text


def test_every_setting_has_one_line_of_meaning() -> None:
    listed = [name for _, meanings in SECTIONS for name in meanings]
    names = set(setting_names())
    assert len(listed) == len(set(listed))
    assert set(listed) == names, (f"add to llamagate/setting_help.py: {sorted(names - set(listed))}; "
                                  f"no longer settings: {sorted(set(listed) - names)}")


@pytest.mark.parametrize(("flag", "message"), [
    ("--prot", "unknown option --prot (did you mean --port?)"),
    ("--model_path", "unknown option --model_path (did you mean --model-path?)"),
    ("--ctxx=8192", "unknown option --ctxx (did you mean --ctx?)"),
    ("--por", "unknown option --por (did you mean --port?)"),  # no abbreviations
    ("--hf-token", "--hf-token: HF_TOKEN is a secret and is read from the environment only"),
    ("--zzzzzz", "unknown option --zzzzzz (llamagate serve --help lists them)"),
])
def test_an_unknown_flag_names_the_closest_one(flag: str, message: str) -> None:
    done = llamagate("serve", flag, "1")
    assert done.returncode == 2
    assert done.stderr.startswith(f"llamagate serve: {message}"), done.stderr


def test_flags_without_a_command_are_serves() -> None:
    done = llamagate("--prot", "1")
    assert (done.returncode, done.stderr.strip()) == (
        2, "llamagate serve: unknown option --prot (did you mean --port?)")


def test_an_unknown_command_names_the_closest_one() -> None:
    done = llamagate("sevre")
    assert done.returncode == 2
    assert "unknown command 'sevre'; did you mean serve?" in done.stderr


def test_a_bad_flag_value_names_the_flag() -> None:
    done = llamagate("serve", "--port", "http", "--ctx", "-5", env={"PARALLEL": "0"})
    assert done.returncode == 2
    assert "--port (command line): PORT='http': expected an integer" in done.stderr
    assert "--ctx (command line): CTX='-5'" in done.stderr
    assert "\n  PARALLEL='0'" in done.stderr  # from the environment: named as before


def test_flag_overlay_wins_over_the_environment() -> None:
    overlay = serve_flags.parse(["--port", "9000", "--log-prompts", "--auth-enabled=false",
                                 "--extra-args", "--flash-attn on", "--ngl", "-1"])
    assert overlay == {"PORT": "9000", "LOG_PROMPTS": "true", "AUTH_ENABLED": "false",
                       "EXTRA_ARGS": "--flash-attn on", "NGL": "-1"}


async def test_a_flag_wins_over_the_environment_in_serve_and_its_children(
        tmp_path: Path, fake: FakeLlama) -> None:
    # the environment says auth on and one health port; the flags say auth off and another:
    # the health process listens where the flag says, and the gateway worker (a child that
    # reads its own settings) serves without a key
    health = free_port()
    svc = Service(tmp_path, {"BACKEND_URL": fake.url, "AUTH_ENABLED": "true"},
                  args=("--auth-enabled", "false", "--port-health", str(health)))
    svc.port_health = health
    await asyncio.to_thread(svc.start)
    try:
        await asyncio.to_thread(svc.wait_ready)
        answer = await asyncio.to_thread(requests.get, f"{svc.url}/v1/models", timeout=5)
        assert answer.status_code == 200, answer.text
        assert (await asyncio.to_thread(svc.health))["auth"] is False
    finally:
        await asyncio.to_thread(svc.stop)


@pytest.mark.llama_server
def test_version_names_llamagate_and_llama_server() -> None:
    done = llamagate("--version", env={"LLAMA_SERVER_PATH": str(llama_server())})
    assert done.returncode == 0
    ours, theirs = done.stdout.splitlines()
    assert ours == "llamagate 0.1.0"
    assert theirs.startswith("llama-server version: ") and str(llama_server()) in theirs


def test_version_without_llama_server(tmp_path: Path) -> None:
    done = llamagate("--version", env={"LLAMA_SERVER_PATH": str(tmp_path / "nothing")})
    assert done.returncode == 0
    assert done.stdout.splitlines()[1].startswith("llama-server not found")
