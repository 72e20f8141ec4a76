from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.models.errors import ValidationError
from backend.models.overrides import Override, OverrideStore, validate_patch


def test_valid_patch() -> None:
    override = validate_patch(
        {
            "enabled": False,
            "alias": "qwen3:8b-q4",
            "tier": "balanced",
            "tags": ["chat", "tools", "thinking"],
            "ctx_size": 0,
            "n_gpu_layers": -1,
            "parallel": 64,
            "extra_args": ["--flash-attn", "on"],
        }
    )
    assert override == Override(
        enabled=False,
        alias="qwen3:8b-q4",
        tier="balanced",
        tags=("chat", "tools", "thinking"),
        ctx_size=0,
        n_gpu_layers=-1,
        parallel=64,
        extra_args=("--flash-attn", "on"),
    )


def test_patch_merges_and_null_resets() -> None:
    base = validate_patch({"alias": "a", "parallel": 2})
    merged = validate_patch({"parallel": None, "tier": "fast"}, base)
    assert merged == Override(alias="a", tier="fast")


@pytest.mark.parametrize(
    ("patch", "field", "accepted"),
    [
        ({"enabled": 1}, "enabled", "must be true or false"),
        ({"alias": "has space"}, "alias", r"must match \[A-Za-z0-9._:-\]\{1,128\}"),
        ({"alias": "x" * 129}, "alias", "must match"),
        ({"alias": ""}, "alias", "must match"),
        ({"tier": "huge"}, "tier", "must be one of fast|balanced|powerful"),
        ({"tags": ["chat", "poetry"]}, "tags", "thinking, embeddings, vision, tools, chat, code"),
        ({"tags": "chat"}, "tags", "must be a list"),
        ({"tags": ["chat", "chat"]}, "tags", "distinct"),
        ({"ctx_size": -1}, "ctx_size", "must be an integer >= 0"),
        ({"ctx_size": "4096"}, "ctx_size", "must be an integer >= 0"),
        ({"n_gpu_layers": -2}, "n_gpu_layers", "must be an integer >= -1"),
        ({"parallel": 0}, "parallel", "must be an integer from 1 to 64"),
        ({"parallel": 65}, "parallel", "from 1 to 64"),
        ({"parallel": True}, "parallel", "must be an integer"),
        ({"extra_args": "--mlock"}, "extra_args", "must be a list of at most 64 strings"),
        ({"extra_args": ["ok", 3]}, "extra_args", "strings"),
        ({"extra_args": ["a\nb"]}, "extra_args", "without NUL or newline"),
        ({"colour": "red"}, "colour", "unknown field; accepted: enabled, alias, tier"),
    ],
)
def test_bad_field_names_field_and_form(patch: dict[str, object], field: str, accepted: str) -> None:
    with pytest.raises(ValidationError, match=accepted) as caught:
        validate_patch(patch)
    assert [f for f, _ in caught.value.problems] == [field]
    assert str(caught.value).startswith(f"{field}: ")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_patch({"tier": "x", "parallel": 0, "nope": 1})
    assert {f for f, _ in caught.value.problems} == {"tier", "parallel", "nope"}


def test_body_must_be_an_object() -> None:
    with pytest.raises(ValidationError, match="must be a JSON object"):
        validate_patch(["alias"])


def test_store_persists_atomically_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "overrides.json"
    store = OverrideStore(path)
    assert store.get("m") == Override()
    store.set("m", Override(alias="fast-one", tags=("chat",)))
    store.set("gone", Override(enabled=False))
    on_disk = json.loads(path.read_text())
    assert on_disk == {
        "version": 1,
        "models": {"gone": {"enabled": False}, "m": {"alias": "fast-one", "tags": ["chat"]}},
    }
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    reopened = OverrideStore(path)
    assert reopened.get("m") == Override(alias="fast-one", tags=("chat",))
    reopened.set("gone", Override())  # back to defaults: the entry is removed
    assert set(json.loads(path.read_text())["models"]) == {"m"}


def test_hand_edited_mistakes_fail_loudly(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"version": 1, "models": {"m": {"parallel": 0}}}))
    with pytest.raises(ValidationError, match=r"models\['m'\]\.parallel: must be an integer"):
        OverrideStore(path).all()
    path.write_text("{oops")
    with pytest.raises(ValidationError, match="not valid JSON"):
        OverrideStore(path).all()
