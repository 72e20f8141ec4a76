"""The Dockerfiles, read without a Docker engine: what they build, and that the ports, the
environment, the health check and the user agree with the configuration object and
.env.example."""

from __future__ import annotations

import re
import tomllib

import pytest

from core.config import load_config, setting_names
from tests.ship.dockerfile import Dockerfile, Instruction, Stage
from tests.ship.dockerignore import DockerIgnore
from tests.ship.project import DOCKERFILES, NON_SETTINGS, ROOT, dockerfile, env_example, seconds

KINDS = sorted(DOCKERFILES)
DEFAULTS = load_config({})


@pytest.fixture(params=KINDS)
def df(request: pytest.FixtureRequest) -> Dockerfile:
    return dockerfile(request.param)


def builder(df: Dockerfile) -> Stage:
    [stage] = [s for s in df.stages if "build_llama_server.sh" in s.run_text()]
    return stage


def copied_from(df: Dockerfile, stage: Stage) -> list[tuple[str, str]]:
    """(source, destination) of the final stage's COPY --from=`stage`."""
    out = []
    for ins in df.final.all("COPY"):
        flags, rest = ins.flags()
        if flags.get("from") == stage.name:
            src, dest = rest.split()
            out.append((src, dest))
    return out


def test_bases_are_pinned_by_tag(df: Dockerfile) -> None:
    names = {s.name for s in df.stages}
    for stage in df.stages:
        assert stage.base not in names, "stages start from images, not from each other"
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, stage.base


def test_cuda_image_builds_with_cuda_on_the_devel_image_and_runs_on_the_runtime_one() -> None:
    df = dockerfile("cuda")
    build = builder(df)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", build.base)
    assert df.final.base == build.base.replace("-devel-", "-runtime-")
    assert "CUDA=1" in build.run_text()


def test_cpu_image_is_python_311_slim_for_amd64_and_arm64() -> None:
    df = dockerfile("cpu")
    assert all(s.base.startswith("python:3.11-slim") for s in df.stages)
    assert "CUDA=0" in builder(df).run_text()
    # nothing may pin one architecture: the same file builds linux/amd64 and linux/arm64
    for stage in df.stages:
        assert not re.search(r"x86_64|amd64|aarch64|arm64", stage.base + stage.run_text())


def test_llama_server_comes_from_the_project_build_script_without_native_tuning(df: Dockerfile) -> None:
    build = builder(df)
    assert any(ins.value.split()[0] == "scripts/build_llama_server.sh" for ins in build.all("COPY"))
    assert "GGML_NATIVE=OFF" in build.run_text()
    env = df.final.env()
    assert env["LLAMA_SERVER_PATH"] == "/usr/local/bin/llama-server"
    assert ("/usr/local/bin/llama-server", env["LLAMA_SERVER_PATH"]) in copied_from(df, build)


def test_python_dependencies_are_installed_from_the_lock(df: Dockerfile) -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    [stage] = [s for s in df.stages if "pip install --no-cache-dir --no-deps ." in s.run_text()]
    sources = {src for ins in stage.all("COPY") if not ins.flags()[0] for src in ins.value.split()[:-1]}
    missing = {"pyproject.toml", "requirements.lock", "requirements-dev.lock",
               *(p.split(".")[0] for p in packages)} - sources
    assert not missing, f"not copied into the image: {missing}"
    assert ("/opt/venv", "/opt/venv") in copied_from(df, stage)


def test_every_subpackage_is_installed() -> None:
    # The images install the project for real (not editable): a package directory missing
    # from pyproject's list is missing from the image, while `make test` would not notice.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in {p.split(".")[0] for p in listed}
             for init in (ROOT / top).rglob("__init__.py")}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages: add {found - listed}"


def test_environment_is_made_of_settings(df: Dockerfile) -> None:
    names = set(setting_names())
    for stage in df.stages:
        unknown = set(stage.env()) - names - NON_SETTINGS
        assert not unknown, f"ENV of neither a setting nor a documented non-setting: {unknown}"
    env = df.final.env()
    settings = {k: v for k, v in env.items() if k in names}
    assert settings == {"DATA_DIR": "/data", "LLAMA_SERVER_PATH": "/usr/local/bin/llama-server"}
    assert set(settings) <= set(env_example())
    config = load_config(settings)
    assert str(config.data_dir) == "/data" and str(config.auth_keys_file) == "/data/keys.json"


def test_ports_match_the_configuration_and_env_example(df: Dockerfile) -> None:
    exposed = {int(p.split("/")[0]) for ins in df.final.all("EXPOSE") for p in ins.value.split()}
    assert exposed == {DEFAULTS.port, DEFAULTS.port_health}
    example = env_example()
    assert {int(example["PORT"]), int(example["PORT_HEALTH"])} == exposed


def test_data_lives_on_a_volume_owned_by_the_non_root_user(df: Dockerfile) -> None:
    final = df.final
    [volume] = final.all("VOLUME")
    paths = volume.exec_form() or volume.value.split()
    assert final.env()["DATA_DIR"] in paths
    user = final.substitute(final.one("USER").value)
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0") and gid != "0", "the service must not run as root"
    run = final.run_text()
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", run), "USER must be a user the image creates"
    assert re.search(r"chown [\w:]+ /data\b", run), "/data must be writable by that user"


def test_healthcheck_asks_the_health_port_for_ping(df: Dockerfile) -> None:
    flags, rest = df.final.one("HEALTHCHECK").flags()
    keyword, _, cmd = rest.partition(" ")
    assert keyword == "CMD"
    argv = Instruction("CMD", cmd, 0).exec_form()
    assert argv is not None and argv[:2] == ["python", "-c"], "exec form: no shell in the check"
    code = argv[2]
    assert "http://127.0.0.1:%s/ping" in code
    assert f"os.environ.get('PORT_HEALTH', '{DEFAULTS.port_health}')" in code
    assert "!= 200" in code, "only 200 is healthy: 204 means the model is still loading"
    assert seconds(flags["timeout"]) < seconds(flags["interval"])
    assert seconds(flags["start-period"]) >= DEFAULTS.backend_start_timeout


def test_pid1_is_tini_forwarding_sigterm_to_llamagate_serve(df: Dockerfile) -> None:
    final = df.final
    assert final.one("ENTRYPOINT").exec_form() == ["tini", "--", "llamagate"]
    assert final.one("CMD").exec_form() == ["serve"]
    assert re.search(r"apt-get install [^&]*\btini\b", final.run_text())
    assert final.one("STOPSIGNAL").value == "SIGTERM"


def test_build_context_holds_what_the_images_copy_and_nothing_private() -> None:
    ignore = DockerIgnore.read(ROOT / ".dockerignore")
    for kind in KINDS:
        for stage in dockerfile(kind).stages:
            for ins in stage.all("COPY"):
                flags, rest = ins.flags()
                if "from" not in flags:
                    for src in rest.split()[:-1]:
                        assert not ignore.excluded(src), f"{kind}: {src} is copied but ignored"
    for private in (".git/HEAD", ".venv/bin/python", "data/keys.json", ".env", "tests/conftest.py",
                    "docker/secrets/metrics_key", "models/m.gguf", "llamagate/__pycache__/x.pyc",
                    "backend/models/x.gguf", "docs/api.md"):
        assert ignore.excluded(private), f"{private} would be sent to the Docker daemon"
