# syntax=docker/dockerfile:1
# llamagate, CUDA image.
#
#   docker build -t llamagate:cuda .                                   # make docker
#   docker build --build-arg CUDA_ARCHITECTURES=90 -t llamagate:cuda .  # H100 only: faster build
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v llamagate-data:/data llamagate:cuda
#
# Stages: llama-server is compiled with CUDA from the llama.cpp sources vendored in the
# pinned llama-cpp-python sdist, by the same script and flags as `make llama-server CUDA=1`
# (so the image serves the llama.cpp the test suite ran against); the gateway runs on a
# standalone CPython 3.11 (the CUDA images' Ubuntu ships 3.10) with the dependencies pinned
# by requirements.lock. docs/deployment.md explains the choices. This file cannot be built
# without its CUDA base; scripts/image_smoke.sh lints it with hadolint.

# The bases, build arguments so that a mirror can replace them. CUDA 12.8 is the first with
# Blackwell (sm_100, sm_120); its containers need an NVIDIA driver of 570 or newer.
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu22.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
# Only where uv comes from (see the python stage); the CPU image's base.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# --- llama-server, built with CUDA -------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS llama-server
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# 75 T4, 80 A100/A30, 86 A10/A40/RTX 30xx/A6000, 89 L4/L40S/RTX 40xx, 90 H100/H200,
# 100 B200/GB200, 120 RTX 50xx/RTX PRO 6000 Blackwell (llama.cpp builds 120 as 120a).
ARG CUDA_ARCHITECTURES="75;80;86;89;90;100;120"
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# Parallel compile jobs (default: all cores); nvcc needs several GB of memory per job.
ARG JOBS=""
# ninja and a recent enough cmake keep scikit-build-core from fetching its own while pip
# reads the sdist's metadata.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build-venv && /opt/build-venv/bin/pip install --no-cache-dir --quiet --upgrade pip
COPY scripts/build_llama_server.sh /src/build_llama_server.sh
# GGML_NATIVE=OFF: the binary must run on whatever CPU the host has, not the build machine's
# (the script also passes it for every CUDA build). --allow-shlib-undefined: libcuda.so.1 comes
# from the host driver at run time; at link time only the toolkit's stub exists (llama.cpp's
# own CUDA image links the same way).
RUN bin="$(CUDA=1 GGML_NATIVE=OFF CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES" \
        LLAMA_CPP_PYTHON_VERSION="$LLAMA_CPP_PYTHON_VERSION" JOBS="$JOBS" \
        LLAMAGATE_CACHE=/opt/llama-build PYTHON=/opt/build-venv/bin/python \
        EXTRA_CMAKE_FLAGS="-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined" \
        bash /src/build_llama_server.sh | tail -n 1)" \
 && install -m 0755 "$bin" /usr/local/bin/llama-server \
 && cp "$(dirname "$bin")/cmake-flags.txt" /usr/local/share/llama-server-cmake-flags.txt

# --- uv, current ------------------------------------------------------------------------------
# uv installs the newest 3.11 patch release it knows of, and knows those published before it
# was: a pinned uv froze the interpreter at that release's CPython. Taking the current uv at
# build time, a rebuild picks up CPython's security releases as the CPU image's base tag does.
FROM ${PYTHON_IMAGE} AS uv
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --quiet --root-user-action=ignore uv

# --- Python 3.11 and the locked dependencies ----------------------------------------------
# Built on the runtime image itself so the interpreter and the virtualenv keep their paths.
FROM ${CUDA_RUNTIME_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /usr/local/bin/uv /usr/local/bin/uv
RUN export UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed \
 && uv python install 3.11 \
 && "$(uv python find 3.11)" -m venv /opt/venv \
 && /opt/venv/bin/python --version \
 && /opt/venv/bin/pip install --no-cache-dir --quiet --upgrade pip
# the C compiler for the request path's mypyc build (below), before the code so it stays cached
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml requirements.lock requirements-dev.lock ./
# The dependencies alone first, in a layer a change to the code does not invalidate.
RUN /opt/venv/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' >/tmp/dependencies.txt \
 && /opt/venv/bin/pip install --no-cache-dir -c requirements.lock -r /tmp/dependencies.txt
COPY core ./core
COPY llamagate ./llamagate
COPY gateway ./gateway
COPY health ./health
COPY backend ./backend
COPY keys ./keys
COPY fleet ./fleet
# The dependencies are in (above, at the locked versions and hashes); --no-deps: a directory
# cannot be hash-checked, so pip refuses it beside the hashed lock.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/llamagate --help
# The request path compiled with mypyc (scripts/build_native.py) beside the installed
# packages, from a copy of the venv with mypy added, so the image carries no compiler or mypy.
# The check (-P: without /src on sys.path, so it imports the installed copy) fails the build
# if the gateway would run as plain Python.
COPY scripts/build_native.py ./scripts/build_native.py
RUN cp -a /opt/venv /opt/build-venv \
 && /opt/build-venv/bin/python -m pip install --no-cache-dir --quiet -c requirements-dev.lock mypy setuptools \
 && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && /opt/build-venv/bin/python scripts/build_native.py --strict --out "$site/.build/native" \
 && /opt/venv/bin/python -P -c 'import gateway.upstream.proxy as p; assert "/.build/native/" in p.__file__, p.__file__' \
 && rm -rf /opt/build-venv

# --- runtime ---------------------------------------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE}
# tini: PID 1 (docker/entrypoint.sh). libgomp1: the OpenMP runtime llama-server links
# against. setpriv, which drops root, is util-linux's, already in the base.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llamagate \
 && useradd --system --uid 10001 --gid llamagate --create-home --home-dir /home/llamagate \
      --shell /usr/sbin/nologin llamagate \
 && mkdir -p /data \
 && chown llamagate:llamagate /data \
 && chmod 700 /data
COPY --from=llama-server /usr/local/bin/llama-server /usr/local/bin/llama-server
COPY --from=llama-server /usr/local/share/llama-server-cmake-flags.txt /usr/local/share/
COPY --from=python /opt/python /opt/python
COPY --from=python /opt/venv /opt/venv
COPY docker/entrypoint.sh /opt/llamagate/bin/llamagate
# DATA_DIR: the platform default for containers (/data) needs /.dockerenv, which containerd
# and Kubernetes do not create; set here, data lands on the volume under every runtime. Where
# the platform's volume is elsewhere, set DATA_DIR=/runpod-volume/llamagate, ...
# PATH: the entrypoint's `llamagate` first, so `docker exec` runs keys commands as uid 10001.
ENV PATH=/opt/llamagate/bin:/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data \
    LLAMA_SERVER_PATH=/usr/local/bin/llama-server
# No USER: the entrypoint starts as root only to give DATA_DIR to uid 10001, then runs
# everything as that user (docker/entrypoint.sh).
WORKDIR /home/llamagate
VOLUME /data
# gateway (PORT), health (PORT_HEALTH)
EXPOSE 8000 8001
# Healthy only on 200: 204 (loading the model) and 503 (unhealthy, draining) fail the check.
# start-period covers the default BACKEND_START_TIMEOUT (300 s) of a large model's load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('PORT_HEALTH', '8001'), timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/llamagate/bin/llamagate"]
CMD ["serve"]
