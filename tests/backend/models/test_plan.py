from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend.models import plan
from backend.models.errors import BadPullRequest, NotEnoughSpace, RemoteNotFound, UnsafePath


@pytest.mark.parametrize(
    "name",
    [
        "../evil.gguf",
        "a/../../evil.gguf",
        "/etc/passwd",
        "C:/x.gguf",
        "a\\..\\b.gguf",
        "",
        "a//b.gguf",
        "./m.gguf",
        ".partial/x.gguf",
        "dir/.hidden.gguf",
    ],
)
def test_paths_that_escape_or_hide_are_rejected(name: str) -> None:
    with pytest.raises(UnsafePath, match="must be a path inside MODELS_DIR"):
        plan.check_relpath(name)


def test_destination_inside_models_dir(tmp_path: Path) -> None:
    assert plan.destination(tmp_path, "sub/m.gguf") == tmp_path.resolve() / "sub" / "m.gguf"


def test_destination_refuses_symlink_escape(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tmp_path, models / "out")
    with pytest.raises(UnsafePath, match="outside MODELS_DIR"):
        plan.destination(models, "out/m.gguf")


@pytest.mark.parametrize("repo", ["org/name", "name", "Org-1/n.a_m-e"])
def test_repo_ids(repo: str) -> None:
    assert plan.check_repo_id(repo) == repo


@pytest.mark.parametrize("repo", ["", "a/b/c", "../x", "org/..", "org/name.git", "o rg/n"])
def test_bad_repo_ids(repo: str) -> None:
    with pytest.raises(BadPullRequest):
        plan.check_repo_id(repo)


def test_naming_one_part_means_every_part() -> None:
    assert plan.split_siblings("q/m-00002-of-00003.gguf") == [
        "q/m-00001-of-00003.gguf",
        "q/m-00002-of-00003.gguf",
        "q/m-00003-of-00003.gguf",
    ]
    assert plan.split_siblings("m.gguf") is None


REPO_FILES = [
    "README.md",
    "m-Q4_K_M.gguf",
    "m-Q8_0.gguf",
    "big/m-Q8_0-00001-of-00002.gguf",
    "big/m-Q8_0-00002-of-00002.gguf",
]


def test_pattern_selects_one_model() -> None:
    assert plan.select_files("o/r", "*Q4_K_M*", REPO_FILES) == ["m-Q4_K_M.gguf"]
    assert plan.select_files("o/r", "big/*-00001-of-*.gguf", REPO_FILES) == [
        "big/m-Q8_0-00001-of-00002.gguf",
        "big/m-Q8_0-00002-of-00002.gguf",
    ]
    with pytest.raises(BadPullRequest, match="matches 2 models"):
        plan.select_files("o/r", "*Q8_0*", REPO_FILES)
    with pytest.raises(RemoteNotFound, match="no .gguf file"):
        plan.select_files("o/r", "*.md", REPO_FILES)


def test_space_check_message() -> None:
    plan.check_space(free=10, need=10, where=Path("/m"))
    with pytest.raises(NotEnoughSpace, match=r"needs 5.0 GiB more on /m, only 1.0 GiB free"):
        plan.check_space(free=1024**3, need=5 * 1024**3, where=Path("/m"))


def test_partial_path_is_content_addressed(tmp_path: Path) -> None:
    sha = "ab" * 32
    assert plan.partial_path(tmp_path, "o/r", "m.gguf", "c" * 40, sha) == (
        tmp_path / ".partial" / f"{sha}.part"
    )
    odd = plan.partial_path(tmp_path, "o/r", "m.gguf", "c" * 40, "W/weird")
    assert odd.parent == tmp_path / ".partial" and odd.name.endswith(".part")
