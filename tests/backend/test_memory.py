"""The prompt cache's default bound (backend/memory.py), read from fake cgroup and /proc
files under a temporary root, and carried to llama-server's command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.argv import ServerSpec, build_argv, common_options
from backend.memory import MIB, default_cache_ram, memory_limit, physical_memory
from backend.settings import cache_ram
from core.config import ConfigError, load_config

GIB = 1024 * MIB


def machine(root: Path, *, cgroup: str, files: dict[str, str], mem_total_kib: int | None = None
            ) -> Path:
    """A fake root: /proc/self/cgroup holding `cgroup`, `files` (paths under the root), and
    /proc/meminfo with MemTotal."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    if mem_total_kib is not None:
        (root / "proc/meminfo").write_text(f"MemTotal:       {mem_total_kib} kB\n"
                                           "MemFree:          1000 kB\n")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def test_cgroup_v2_memory_max_of_a_namespaced_container(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="0::/\n", files={"sys/fs/cgroup/memory.max": str(2 * GIB)})
    assert memory_limit(root) == 2 * GIB


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="0::/\n", files={"sys/fs/cgroup/memory.max": "max"},
                   mem_total_kib=16 * 1024 * 1024)
    assert memory_limit(root) is None
    assert physical_memory(root) == 16 * GIB


def test_an_ancestor_cgroups_limit_binds_too(tmp_path: Path) -> None:
    """A host's systemd slice: the process's own group has no limit, its slice has."""
    root = machine(tmp_path, cgroup="0::/llm.slice/llamagate.service\n", files={
        "sys/fs/cgroup/llm.slice/llamagate.service/memory.max": "max",
        "sys/fs/cgroup/llm.slice/memory.max": str(3 * GIB),
        "sys/fs/cgroup/memory.max": "max"})
    assert memory_limit(root) == 3 * GIB


def test_cgroup_v1_limit_and_its_unlimited_value(tmp_path: Path) -> None:
    limited = machine(tmp_path / "a", cgroup="4:memory:/docker/abc\n1:cpu:/docker/abc\n",
                      files={"sys/fs/cgroup/memory/memory.limit_in_bytes": str(4 * GIB)})
    assert memory_limit(limited) == 4 * GIB  # the path is not under the mount: the mount is ours
    unlimited = machine(tmp_path / "b", cgroup="4:memory:/\n", files={
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712"})
    assert memory_limit(unlimited) is None


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert memory_limit(tmp_path) is None and physical_memory(tmp_path) is None
    assert default_cache_ram(0, root=tmp_path) == 8192  # nothing to go by: llama-server's own


@pytest.mark.parametrize(("limit", "model", "servers", "mib"), [
    (2 * GIB, 0, 1, 512),  # a quarter of a 2 GiB container
    (2 * GIB, 1 * GIB, 1, 512),  # half of what a 1 GiB model leaves is 512 too
    (8 * GIB, 7 * GIB, 1, 512),  # a model that fills the box leaves little for a cache
    (8 * GIB, 6 * GIB, 1, 1024),
    (4 * GIB, 0, 2, 512),  # router mode: a cache per loaded model
    (64 * GIB, 4 * GIB, 1, 8192),  # never above llama-server's own default
    (1 * GIB, 2 * GIB, 1, 0),  # a model bigger than the limit: no cache at all
])
def test_the_default_is_a_quarter_or_half_of_what_the_model_leaves(
        tmp_path: Path, limit: int, model: int, servers: int, mib: int) -> None:
    root = machine(tmp_path, cgroup="0::/\n", files={"sys/fs/cgroup/memory.max": str(limit)},
                   mem_total_kib=128 * 1024 * 1024)
    assert default_cache_ram(model, servers, root=root) == mib


def test_physical_memory_bounds_a_limit_above_it(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="0::/\n", files={"sys/fs/cgroup/memory.max": str(64 * GIB)},
                   mem_total_kib=4 * 1024 * 1024)
    assert default_cache_ram(0, root=root) == 1024


def test_argv_and_router_preset_carry_the_cache_bound(tmp_path: Path) -> None:
    spec = ServerSpec(binary=tmp_path / "llama-server", model_path=tmp_path / "m.gguf",
                      alias="m", port=9, api_key_file=tmp_path / "key", cache_ram=512,
                      extra_args=("--cache-ram", "0"))
    argv = build_argv(spec)
    assert argv[argv.index("--cache-ram") + 1] == "512"
    assert argv[-2:] == ["--cache-ram", "0"]  # EXTRA_ARGS come last: the operator's word wins
    assert ("cache-ram", "512") in common_options(spec)
    unset = ServerSpec(binary=tmp_path / "llama-server", model_path=tmp_path / "m.gguf",
                       alias="m", port=9, api_key_file=tmp_path / "key")
    assert "--cache-ram" not in build_argv(unset)


def test_cache_ram_setting_overrides_the_derivation(tmp_path: Path) -> None:
    assert cache_ram(load_config({"CACHE_RAM": "-1"}), tmp_path / "m.gguf") == -1
    assert cache_ram(load_config({"CACHE_RAM": "0"}), None) == 0
    assert load_config({}).cache_ram is None
    with pytest.raises(ConfigError, match="CACHE_RAM='-2'"):
        load_config({"CACHE_RAM": "-2"})
