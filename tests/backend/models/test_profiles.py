from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from backend.models.errors import ProfileError
from backend.models.profiles import Profile, ProfileModel, load_profiles, parse_profiles

KNOWN = {"Qwen3-8B-Q4_K_M", "Qwen3-1.7B-Q8_0", "nomic-embed"}

VALID = """\
profiles:
  daily:
    description: everyday chat
    models:
      - model: Qwen3-8B-Q4_K_M
        alias: chat
        preload: true
        ctx_size: 16384
        n_gpu_layers: -1
        parallel: 4
        extra_args: ["--flash-attn", "on"]
        fallback: small
      - model: Qwen3-1.7B-Q8_0
        alias: small
  embed: [{model: nomic-embed}]
"""


def test_valid_profiles_are_frozen_dataclasses(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(VALID)
    profiles = load_profiles(path, KNOWN)
    assert profiles.names() == ("daily", "embed")
    daily = profiles.get("daily")
    assert daily == Profile(
        name="daily",
        description="everyday chat",
        models=(
            ProfileModel(
                model="Qwen3-8B-Q4_K_M",
                alias="chat",
                preload=True,
                ctx_size=16384,
                n_gpu_layers=-1,
                parallel=4,
                extra_args=("--flash-attn", "on"),
                fallback="small",
            ),
            ProfileModel(model="Qwen3-1.7B-Q8_0", alias="small"),
        ),
    )
    assert profiles.get("embed").models == (ProfileModel(model="nomic-embed"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        daily.name = "other"  # type: ignore[misc]
    with pytest.raises(KeyError):
        profiles.get("nope")


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ProfileError) as caught:
        parse_profiles(text, KNOWN, source="p.yaml")
    return list(caught.value.problems)


def test_unknown_model_names_line_and_field() -> None:
    text = "profiles:\n  p:\n    - model: Qwen3-8B-Q4_K_M\n    - model: llama-9000\n"
    with pytest.raises(ProfileError) as caught:
        parse_profiles(text, KNOWN, source="p.yaml")
    message = str(caught.value)
    assert message.startswith("p.yaml:4: profiles.p.models[1].model: unknown model 'llama-9000'")
    assert "known: Qwen3-1.7B-Q8_0, Qwen3-8B-Q4_K_M, nomic-embed" in message


def test_unknown_key_names_its_line() -> None:
    text = "profiles:\n  p:\n    - model: nomic-embed\n      ctx: 4096\n"
    ((line, field, message),) = problems(text)
    assert (line, field) == (4, "profiles.p.models[0].ctx")
    assert message.startswith("unknown key; accepted: model, alias, preload, ctx_size")


@pytest.mark.parametrize(
    ("entry", "field", "accepted"),
    [
        ("ctx_size: -5", "ctx_size", "must be an integer >= 0"),
        ("ctx_size: big", "ctx_size", "must be an integer >= 0"),
        ("parallel: 100", "parallel", "from 1 to 64"),
        ("n_gpu_layers: -7", "n_gpu_layers", ">= -1"),
        ("preload: maybe", "preload", "true or false"),
        ("alias: 'bad alias'", "alias", "must match"),
        ("extra_args: --mlock", "extra_args", "must be a list"),
        ("fallback: 3", "fallback", "must be a model name"),
    ],
)
def test_bad_values_name_line_and_field(entry: str, field: str, accepted: str) -> None:
    text = f"profiles:\n  p:\n    - model: nomic-embed\n\n      {entry}\n"
    found = problems(text)
    assert found[0][0] == 5
    assert found[0][1] == f"profiles.p.models[0].{field}"
    assert accepted in found[0][2]


def test_all_problems_reported_in_line_order() -> None:
    text = (
        "profiles:\n"
        "  p:\n"
        "    - model: nope\n"  # 3
        "      parallel: 0\n"  # 4
        "    - alias: x\n"  # 5: no model
        "  q:\n"
        "    models: []\n"  # 7
    )
    found = problems(text)
    assert [line for line, _, _ in found] == [3, 4, 5, 7]
    assert found[2][1:] == ("profiles.p.models[1].model", "missing required key")


def test_duplicate_keys_are_errors_not_silently_merged() -> None:
    text = "profiles:\n  p:\n    - model: nomic-embed\n      parallel: 2\n      parallel: 3\n"
    assert problems(text) == [(5, "profiles.p.models[0].parallel", "duplicate key")]


def test_fallback_must_be_served_by_the_profile_and_acyclic() -> None:
    text = (
        "profiles:\n"
        "  p:\n"
        "    - {model: Qwen3-8B-Q4_K_M, alias: a, fallback: b}\n"
        "    - {model: Qwen3-1.7B-Q8_0, alias: b, fallback: a}\n"
        "    - {model: nomic-embed, fallback: nomic-embed}\n"
        "  q:\n"
        "    - {model: nomic-embed, fallback: Qwen3-8B-Q4_K_M}\n"
    )
    found = problems(text)
    assert [(line, field) for line, field, _ in found] == [
        (3, "profiles.p.models[0].fallback"),
        (4, "profiles.p.models[1].fallback"),
        (5, "profiles.p.models[2].fallback"),
        (7, "profiles.q.models[0].fallback"),
    ]
    assert found[0][2] == "fallback cycle: a -> b -> a"
    assert found[2][2] == "cannot be the model itself"
    assert "not served by this profile" in found[3][2]


def test_same_served_name_twice() -> None:
    text = "profiles:\n  p:\n    - model: nomic-embed\n    - model: nomic-embed\n"
    assert problems(text) == [(4, "profiles.p", "'nomic-embed' is served twice; give one of them an alias")]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "empty file"),
        ("profiles: [a, b]\n", 1, "must be a mapping"),
        ("other: 1\nprofiles: {}\n", 1, "unknown key; accepted: profiles"),
        ("profiles:\n  p:\n    - model: x\n   bad indent: [\n", 4, "YAML syntax"),
        ("profiles:\n  p:\n    description: d\n", 3, "missing required key"),
    ],
)
def test_document_level_errors(text: str, line: int, message: str) -> None:
    found = problems(text)
    assert found[0][0] == line
    assert message in found[0][2]
