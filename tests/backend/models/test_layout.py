from __future__ import annotations

from backend.models.layout import FileGroup, group_files, parse_split


def test_parse_split() -> None:
    split = parse_split("Qwen3-32B-Q4_K_M-00002-of-00003")
    assert split is not None and (split.base, split.part, split.count) == ("Qwen3-32B-Q4_K_M", 2, 3)
    assert parse_split("model") is None
    assert parse_split("m-00004-of-00003") is None  # part beyond count
    assert parse_split("m-0001-of-0003") is None  # gguf-split writes five digits


def test_groups_plain_and_split_files() -> None:
    groups = group_files(
        [
            "a.gguf",
            "sub/b-00001-of-00002.gguf",
            "sub/b-00002-of-00002.gguf",
            "c-00001-of-00003.gguf",
            "c-00003-of-00003.gguf",
        ]
    )
    assert groups == [
        FileGroup("a", {1: "a.gguf"}, 1, None),
        FileGroup(
            "c", {1: "c-00001-of-00003.gguf", 3: "c-00003-of-00003.gguf"}, 3, "missing split parts 2 of 3"
        ),
        FileGroup("sub/b", {1: "sub/b-00001-of-00002.gguf", 2: "sub/b-00002-of-00002.gguf"}, 2, None),
    ]
    assert groups[2].stem == "b"


def test_plain_file_clashing_with_a_split_set_is_flagged() -> None:
    groups = group_files(["m.gguf", "m-00001-of-00002.gguf", "m-00002-of-00002.gguf"])
    assert len(groups) == 1
    assert groups[0].problem == "both m.gguf and split parts of m exist"


def test_disagreeing_part_counts_are_flagged() -> None:
    (group,) = group_files(["m-00001-of-00002.gguf", "m-00002-of-00003.gguf"])
    assert group.problem is not None and "disagree" in group.problem
