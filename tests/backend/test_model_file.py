"""What the supervisor can tell about a model file before llama-server tries it
(backend/model_file.py)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.model_file import model_problem

NOBODY = 65534


def test_a_gguf_file_has_no_problem(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert model_problem(model) is None


def test_each_problem_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "gone.gguf"
    assert model_problem(missing) == f"model file not found: {missing}"
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    assert model_problem(folder) == f"model file is not a regular file: {folder}"
    html = tmp_path / "page.gguf"  # a download that saved an error page
    html.write_text("<html>404</html>")
    assert model_problem(html) == ("model file is not a GGUF file (no GGUF magic at its "
                                   f"start): {html}")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "not a GGUF file" in (model_problem(empty) or "")


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder anyone may enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="llamagate-model-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


@contextlib.contextmanager
def as_user(uid: int) -> Iterator[None]:
    """File access checked as `uid` for the block: the effective uid only, so root (the
    real uid) takes it back after."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_file_is_named(open_folder: Path) -> None:
    """Root reads a 0000 file all the same, so as root (CI) the check runs with the
    effective uid of nobody; as another user it runs as that user."""
    model = open_folder / "m.gguf"
    model.write_bytes(b"GGUF")
    model.chmod(0o000)
    unreadable = f"model file not readable: {model} (Permission denied)"
    if os.geteuid() != 0:
        assert model_problem(model) == unreadable
        return
    with as_user(NOBODY):
        assert model_problem(model) == unreadable
    model.chmod(0o644)
    with as_user(NOBODY):
        assert model_problem(model) is None  # the same user reads it once it may
