"""The compiled request path (gateway/native.py) is used only when it was built from the
sources on disk, for this interpreter, and not turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import native

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tree with the watched packages and a build whose manifest matches them."""
    monkeypatch.delenv("LLAMAGATE_NATIVE", raising=False)
    monkeypatch.delenv(native.CHECKED, raising=False)
    for package in ("gateway", "backend", "keys", "core", "llamagate"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text(f"NAME = {package!r}\n")
    build = tmp_path / native.BUILD_DIR
    (build / "gateway").mkdir(parents=True)
    (build / "manifest.json").write_text(native.manifest_for(tmp_path))
    before, finders = list(sys.path), list(sys.meta_path)
    yield tmp_path
    sys.path[:] = before  # use_native adds the build for mypyc's runtime library
    sys.meta_path[:] = finders


def test_a_current_build_finds_exactly_the_compiled_modules(checkout: Path) -> None:
    assert native.use_native(checkout)
    finder = sys.meta_path[0]
    assert isinstance(finder, native.CompiledFinder)
    assert set(finder.files) == set(native.COMPILED)
    build = checkout / native.BUILD_DIR
    assert finder.files["gateway.upstream.proxy"].parent == build / "gateway" / "upstream"
    assert finder.find_spec("gateway.app", None) is None  # not compiled: the plain module


def test_a_checked_manifest_is_not_hashed_again(
        checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve checks once; its children compare the manifest only (no 600 KB hash each)."""
    assert native.use_native(checkout)
    manifest = (checkout / native.BUILD_DIR / "manifest.json").read_text()
    assert os.environ[native.CHECKED] == manifest
    monkeypatch.setattr(native, "_digest", _never)
    assert native.use_native(checkout)
    monkeypatch.setenv(native.CHECKED, "another build")  # a swapped build is checked in full
    with pytest.raises(AssertionError, match="hashed"):
        native.use_native(checkout)


def _never(root: Path) -> str:
    raise AssertionError("the sources were hashed again")


def test_an_edited_source_leaves_the_build_unused(
        checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (checkout / "llamagate" / "m.py").write_text("NAME = 'edited'\n")
    finders = list(sys.meta_path)
    assert not native.use_native(checkout)
    assert sys.meta_path == finders
    assert "make setup rebuilds it" in capsys.readouterr().err


def test_an_editors_lock_file_is_not_a_source(checkout: Path) -> None:
    (checkout / "gateway" / ".#m.py").symlink_to("user@host.1234")  # dangling, as Emacs makes
    assert native.use_native(checkout)


def test_a_new_module_leaves_the_build_unused(checkout: Path) -> None:
    (checkout / "keys" / "added.py").write_text("")
    assert not native.use_native(checkout)


def test_a_build_for_another_interpreter_is_not_used(checkout: Path) -> None:
    manifest = checkout / native.BUILD_DIR / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "abi": ".cpython-39.so"}))
    assert not native.use_native(checkout)


def test_no_build_is_plain_python(checkout: Path) -> None:
    (checkout / native.BUILD_DIR / "manifest.json").unlink()
    assert not native.use_native(checkout)


def test_llamagate_native_0_turns_it_off(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAGATE_NATIVE", "0")
    assert not native.use_native(checkout)


def _proxy_module(env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", "import gateway.upstream.proxy as p; print(p.__file__)"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_this_checkout_runs_what_its_build_says() -> None:
    """After `make setup` the gateway here runs compiled; with the switch off, plain Python.
    (.ci/run fails before the tests when setup could not compile, so there this asserts that
    the build loads.)"""
    env = {"PATH": "/usr/bin:/bin"}
    manifest = ROOT / native.BUILD_DIR / "manifest.json"
    current = manifest.exists() and manifest.read_text() == native.manifest_for(ROOT)
    assert _proxy_module(env).endswith(".so") == current
    assert _proxy_module({**env, "LLAMAGATE_NATIVE": "0"}).endswith("gateway/upstream/proxy.py")
