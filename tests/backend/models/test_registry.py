from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from backend.models.errors import UnknownModel, ValidationError
from backend.models.gguf_meta import GGUFInfo, read_gguf_info
from backend.models.overrides import OverrideStore
from backend.models.registry import ModelRegistry

from .ggufs import write_gguf, write_tiny


class CountingReader:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> GGUFInfo:
        self.paths.append(path)
        return read_gguf_info(path)


@pytest.fixture
def tree(models_dir: Path) -> Path:
    write_tiny(models_dir / "tiny.gguf")
    write_gguf(models_dir / "big" / "big-00001-of-00002.gguf", size_label="70B", split=(1, 2))
    write_gguf(models_dir / "big" / "big-00002-of-00002.gguf", name=None, split=(2, 2))
    write_gguf(models_dir / "half-00001-of-00003.gguf", split=(1, 3))
    write_gguf(models_dir / "half-00003-of-00003.gguf", split=(3, 3))
    (models_dir / "broken.gguf").write_bytes(b"this is not a gguf file")
    (models_dir / "notes.txt").write_text("ignored")
    write_gguf(models_dir / ".partial" / "hidden.gguf")  # pulls in progress are not models
    return models_dir


def make_registry(models_dir: Path, data_dir: Path, reader: CountingReader | None = None) -> ModelRegistry:
    store = OverrideStore(data_dir / "overrides.json")
    return ModelRegistry(models_dir, store, reader=reader or CountingReader())


def test_scan_lists_valid_split_and_invalid_models(tree: Path, data_dir: Path) -> None:
    registry = make_registry(tree, data_dir)
    entries = {e.name: e for e in registry.scan()}
    assert set(entries) == {"tiny", "big", "half", "broken"}

    tiny = entries["tiny"]
    assert tiny.status == "ok" and tiny.servable and tiny.error is None
    assert tiny.path == tree / "tiny.gguf" and tiny.split_count == 1
    assert tiny.info is not None and tiny.info.architecture == "llama"
    assert tiny.size_label is not None and tiny.parameter_count == tiny.info.parameter_count

    big = entries["big"]
    assert big.status == "ok" and big.key == "big/big"
    assert big.parts == (tree / "big/big-00001-of-00002.gguf", tree / "big/big-00002-of-00002.gguf")
    assert big.size == sum(p.stat().st_size for p in big.parts)
    assert big.size_label == "70B"
    assert big.parameter_count == 2 * 8 * 4  # both parts' tensors

    half = entries["half"]
    assert half.status == "invalid" and half.error == "missing split parts 2 of 3"
    assert len(half.parts) == 2

    broken = entries["broken"]
    assert broken.status == "invalid" and not broken.servable
    assert broken.error is not None and "bad magic" in broken.error

    as_json = tiny.to_dict()
    assert as_json["name"] == "tiny" and as_json["metadata"]["context_length"] > 0


def test_rescan_reuses_metadata_of_unchanged_files(tree: Path, data_dir: Path) -> None:
    reader = CountingReader()
    registry = make_registry(tree, data_dir, reader)
    registry.scan()
    first = len(reader.paths)
    assert first == 6
    registry.scan()
    assert len(reader.paths) == first  # nothing changed: no header read

    tiny = tree / "tiny.gguf"
    write_tiny(tiny, seed=1)
    st = tiny.stat()
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    registry.scan()
    assert reader.paths[first:] == [tiny]


def test_names_unique_stems_by_key(models_dir: Path, data_dir: Path) -> None:
    write_gguf(models_dir / "a" / "same.gguf")
    write_gguf(models_dir / "b" / "same.gguf")
    registry = make_registry(models_dir, data_dir)
    assert sorted(e.name for e in registry.scan()) == ["a/same", "b/same"]


def test_alias_override_renames_and_survives_restart(tree: Path, data_dir: Path) -> None:
    registry = make_registry(tree, data_dir)
    registry.scan()
    entry = registry.update("tiny", {"alias": "chat", "tier": "fast", "tags": ["chat"]})
    assert entry.name == "chat" and entry.key == "tiny"
    assert registry.get("chat") == entry
    assert registry.get("tiny") == entry  # the key still resolves
    with pytest.raises(UnknownModel):
        registry.get("nope")

    again = make_registry(tree, data_dir)
    entries = {e.name: e for e in again.scan()}
    assert entries["chat"].override.tier == "fast"
    assert "chat" in again.names()


def test_alias_must_be_unique(tree: Path, data_dir: Path) -> None:
    registry = make_registry(tree, data_dir)
    registry.scan()
    with pytest.raises(ValidationError, match="alias: must be unique"):
        registry.update("tiny", {"alias": "big"})
    with pytest.raises(ValidationError, match="tier"):
        registry.update("tiny", {"tier": "enormous"})


def test_vanished_model_with_overrides_is_kept_as_missing(tree: Path, data_dir: Path) -> None:
    registry = make_registry(tree, data_dir)
    registry.scan()
    registry.update("tiny", {"parallel": 2})
    (tree / "tiny.gguf").unlink()
    shutil.rmtree(tree / "big")  # no overrides: simply gone
    entries = {e.name: e for e in registry.scan()}
    assert "big" not in entries
    assert entries["tiny"].status == "missing"
    assert entries["tiny"].override.parallel == 2
    assert not entries["tiny"].servable

    # Also after a restart, and it comes back when the file does.
    again = make_registry(tree, data_dir)
    assert {e.name: e.status for e in again.scan()}["tiny"] == "missing"
    write_tiny(tree / "tiny.gguf")
    assert {e.name: e.status for e in again.scan()}["tiny"] == "ok"


def test_disabled_model_is_listed_but_not_servable(tree: Path, data_dir: Path) -> None:
    registry = make_registry(tree, data_dir)
    registry.scan()
    entry = registry.update("tiny", {"enabled": False})
    assert entry.status == "ok" and not entry.servable


def test_missing_models_dir_is_an_empty_catalogue(tmp_path: Path, data_dir: Path) -> None:
    assert make_registry(tmp_path / "nowhere", data_dir).scan() == []
