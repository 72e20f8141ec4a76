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

ENTRYPOINT_SCRIPT = ROOT / "docker" / "entrypoint.sh"

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


def test_each_base_is_a_build_argument(df: Dockerfile) -> None:
    # so a mirror, or scripts/image_smoke.sh's stand-in where no registry is reachable,
    # can replace it without editing the file
    for stage in df.stages:
        m = re.fullmatch(r"\$\{([A-Z_]+)\}", stage.base_source)
        assert m and m.group(1) in df.global_args, f"FROM {stage.base_source}: not one build argument"


def test_cuda_image_builds_with_cuda_on_the_devel_image_and_runs_on_the_runtime_one() -> None:
    df = dockerfile("cuda")
    build = builder(df)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", build.base)
    assert df.final.base == build.base.replace("-devel-", "-runtime-")
    assert "CUDA=1" in build.run_text()


def test_cuda_image_is_cuda_12_8_or_newer_for_every_current_data_center_and_rtx_gpu() -> None:
    build = builder(dockerfile("cuda"))
    version = tuple(int(n) for n in re.findall(r"\d+", build.base.split(":")[1].split("-")[0]))
    assert version >= (12, 8), "sm_100 and sm_120 (Blackwell) need CUDA 12.8"
    # T4, A100, A10/3090, L4/4090, H100, B200, RTX 50xx
    assert build.args["CUDA_ARCHITECTURES"].split(";") == ["75", "80", "86", "89", "90", "100", "120"]
    assert 'CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES"' in build.run_text()


def test_cuda_image_python_follows_patch_releases_not_a_uv_pin() -> None:
    # uv installs the newest 3.11 release it knows of; a pinned uv froze CPython at the
    # release that uv version knew (3.11.11 with uv 0.5.11)
    df = dockerfile("cuda")
    assert not any("astral-sh/uv" in s.base for s in df.stages)
    assert not {"UV_VERSION"} & (set(df.global_args) | {a for s in df.stages for a in s.args})
    [uv] = [s for s in df.stages if re.search(r"pip install .*\buv\b", s.run_text())]
    assert not re.search(r"\buv[=<>~!]", uv.run_text()), "uv must not be pinned"
    [python] = [s for s in df.stages if "uv python install" in s.run_text()]
    assert re.search(r"uv python install 3\.11(\s|$)", python.run_text()), "3.11, not one 3.11.x"
    assert python.base == df.final.base, "the interpreter must keep its path in the runtime image"


def test_cpu_image_is_python_311_slim_for_amd64_and_arm64() -> None:
    df = dockerfile("cpu")
    assert all(s.base.startswith("python:3.11-slim") for s in df.stages)
    assert "CUDA=0" in builder(df).run_text()
    # nothing may pin one architecture: the same file builds linux/amd64 and linux/arm64
    for stage in df.stages:
        assert not re.search(r"x86_64|amd64|aarch64|arm64", stage.base + stage.run_text())


def test_cpu_image_picks_its_cpu_kernels_at_run_time() -> None:
    # llama.cpp's own CPU images: every CPU variant built as a module, the best one for the
    # host loaded at start, so an AVX-512 or ARM dotprod host is not served AVX2 or baseline code
    df = dockerfile("cpu")
    # bookworm's GCC 12 refuses the arm64 variants' -march=armv9.2-a+sme; trixie's GCC 14 builds them
    assert not df.global_args["PYTHON_IMAGE"].endswith("bookworm")
    run = builder(df).run_text()
    for flag in ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DBUILD_SHARED_LIBS=ON",
                 "-DCMAKE_INSTALL_RPATH=\\$ORIGIN"):
        assert flag in run, flag
    # the user's flags come after, so they win
    assert run.index("-DGGML_CPU_ALL_VARIANTS=ON") < run.index("$EXTRA_CMAKE_FLAGS")
    # ggml looks for its modules beside the executable, and $ORIGIN finds the libraries there:
    # the whole build directory is copied, and LLAMA_SERVER_PATH leads into it
    [(src, dest)] = copied_from(df, builder(df))
    assert f"cp -a \"$(dirname \"$bin\")\" {src}" in run
    assert f"ln -s {dest}/llama-server {df.final.env()['LLAMA_SERVER_PATH']}" in df.final.run_text()


def test_llama_server_comes_from_the_project_build_script_without_native_tuning(df: Dockerfile) -> None:
    build = builder(df)
    assert any(ins.value.split()[0] == "scripts/build_llama_server.sh" for ins in build.all("COPY"))
    assert "GGML_NATIVE=OFF" in build.run_text()
    env = df.final.env()
    assert env["LLAMA_SERVER_PATH"] == "/usr/local/bin/llama-server"
    copied = copied_from(df, build)
    linked = re.findall(r"ln -s (\S+) (\S+)", df.final.run_text())
    assert ("/usr/local/bin/llama-server", env["LLAMA_SERVER_PATH"]) in copied or any(
        link == env["LLAMA_SERVER_PATH"] and any(target.startswith(dest + "/") for _, dest in copied)
        for target, link in linked), "LLAMA_SERVER_PATH must be the binary the build stage made"


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


def entrypoint(df: Dockerfile) -> str:
    """The ENTRYPOINT's path, which must be docker/entrypoint.sh copied into the image."""
    [path] = df.final.one("ENTRYPOINT").exec_form() or []
    assert any(ins.value.split() == ["docker/entrypoint.sh", path] for ins in df.final.all("COPY"))
    return path


def test_data_lives_on_a_volume_and_the_entrypoint_drops_root_for_the_service_user(df: Dockerfile) -> None:
    final = df.final
    [volume] = final.all("VOLUME")
    paths = volume.exec_form() or volume.value.split()
    assert final.env()["DATA_DIR"] in paths
    # started as root only to give DATA_DIR (a platform's root-owned volume) to the service
    # user, as the postgres and redis images do; tests/ship/test_entrypoint.py runs the script
    assert not final.all("USER"), "no USER: the entrypoint starts as root, then drops"
    entrypoint(df)
    script = ENTRYPOINT_SCRIPT.read_text()
    [uid] = re.findall(r"^uid=(\d+)$", script, re.M)
    assert re.search(r'exec setpriv --reuid="\$uid" --regid="\$gid"', script)
    run = final.run_text()
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", run), "the script's uid is a user the image creates"
    assert re.search(r"chown [\w:]+ /data\b", run), "/data, the volume's default, is that user's"


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
    path = entrypoint(df)
    assert final.one("CMD").exec_form() == ["serve"]
    assert re.search(r"apt-get install [^&]*\btini\b", final.run_text())
    script = ENTRYPOINT_SCRIPT.read_text()
    assert 'if [ "$$" = 1 ]; then\n  set -- tini -- "$app" "$@"' in script
    assert re.search(r"^app=/opt/venv/bin/llamagate$", script, re.M)
    # `docker exec CONTAINER llamagate keys ...` finds the entrypoint first, so it drops root too
    assert final.env()["PATH"].startswith(f"{path.rsplit('/', 1)[0]}:/opt/venv/bin:")
    assert path.endswith("/llamagate")
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
