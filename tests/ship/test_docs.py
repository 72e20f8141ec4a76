"""The deployment and operations docs refer only to things that exist: settings, build and
compose variables, make targets, CLI commands, and each other."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from core.config import setting_names
from keys.cli import build_parser
from llamagate.cli import COMMANDS
from llamagate.cli import main as llamagate_main
from tests.ship.project import COMPOSE, DOCKERFILES, NON_SETTINGS, ROOT, dockerfile

DOCS = sorted((ROOT / "docs").glob("*.md"))
SHIP_DOCS = ["architecture.md", "api.md", "deployment.md", "operations.md", "troubleshooting.md",
             "migration.md"]


def text(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def build_variables() -> set[str]:
    """Variables the llama-server build script reads and the images' build arguments."""
    script = (ROOT / "scripts" / "build_llama_server.sh").read_text()
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", script))
    for kind in DOCKERFILES:
        df = dockerfile(kind)
        names |= set(df.global_args)
        for stage in df.stages:
            names |= set(stage.args)
    return names


def compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))


def test_the_ship_docs_exist() -> None:
    for name in SHIP_DOCS:
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_docs_resolve(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", doc.read_text()):
        assert (doc.parent / target).is_file(), f"{doc.name} links to missing {target}"


@pytest.mark.parametrize("name", SHIP_DOCS)
def test_variables_set_in_the_docs_exist(name: str) -> None:
    known = set(setting_names()) | NON_SETTINGS | build_variables() | compose_variables()
    known.add("PIP_INDEX_URL")  # pip's own, for builds behind a mirror
    assigned = set(re.findall(r"(?<![\w-])([A-Z][A-Z0-9_]{2,})=", text(name)))
    assert assigned <= known, f"{name} sets variables that are not settings: {assigned - known}"


def test_compose_variables_are_documented() -> None:
    deployment = text("deployment.md")
    missing = {v for v in compose_variables() if f"`{v}`" not in deployment}
    assert not missing, f"docker-compose.yml variables missing from deployment.md: {missing}"


def test_non_settings_are_explained() -> None:
    deployment = text("deployment.md")
    assert all(f"`{name}`" in deployment for name in NON_SETTINGS)


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))
    for name in SHIP_DOCS:
        used = set(re.findall(r"`make ([a-z][a-z-]*)", text(name)))
        used |= set(re.findall(r"^make ([a-z][a-z-]*)", text(name), flags=re.MULTILINE))
        assert used <= targets, f"{name}: no such make target {used - targets}"


def code(doc: str) -> str:
    """The fenced blocks and inline code spans of a Markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", doc, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```.*?^```", "", doc, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(blocks + re.findall(r"`([^`\n]+)`", prose))


def test_cli_commands_exist() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        llamagate_main(["--help"])
    commands = set(COMMANDS)
    assert all(f"\n  {c} " in out.getvalue() for c in commands)  # `llamagate --help` lists them
    subparsers = build_parser()._subparsers
    assert subparsers is not None
    [choices_map] = [a.choices for a in subparsers._group_actions if a.choices]
    key_commands = set(choices_map)
    for name in SHIP_DOCS:
        snippets = code(text(name))
        # "llamagate llamagate keys": a container named llamagate running the command
        used = set(re.findall(r"\bllamagate ([a-z][a-z-]*)", snippets)) - {"llamagate"}
        assert used <= commands, f"{name}: no such llamagate command {used - commands}"
        keys_used = set(re.findall(r"(?:llamagate keys|key_mgmt\.py) ([a-z]+)", snippets))
        assert keys_used <= key_commands, f"{name}: no such keys command {keys_used - key_commands}"
