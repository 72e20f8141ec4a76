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
# by requirements.lock. docs/deployment.md explains the choices.

ARG CUDA_VERSION=12.4.1
ARG UBUNTU_VERSION=22.04
ARG UV_VERSION=0.5.11

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# --- llama-server, built with CUDA -------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS llama-server
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# 80 A100/A30, 86 A40/A10/RTX 30xx/A6000, 89 L4/L40S/RTX 40xx, 90 H100/H200.
ARG CUDA_ARCHITECTURES="80;86;89;90"
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# Parallel compile jobs (default: all cores); nvcc needs several GB of memory per job.
ARG JOBS=""
# ninja and a recent enough cmake keep scikit-build-core from fetching its own while pip
# reads the sdist's metadata.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build-venv && /opt/build-venv/bin/pip install --quiet --upgrade pip
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

# --- Python 3.11 and the locked dependencies ----------------------------------------------
# Built on the runtime image itself so the interpreter and the virtualenv keep their paths.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
RUN export UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed \
 && uv python install 3.11 \
 && "$(uv python find 3.11)" -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --quiet --upgrade pip
WORKDIR /src
COPY pyproject.toml requirements.lock requirements-dev.lock ./
COPY core ./core
COPY llamagate ./llamagate
COPY gateway ./gateway
COPY health ./health
COPY backend ./backend
COPY keys ./keys
# Every dependency at the version and hash the test suite ran with; then the project alone
# (--no-deps: a directory cannot be hash-checked, so pip refuses it beside the hashed lock).
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/llamagate --help
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The request path compiled with mypyc (scripts/build_native.py) beside the installed
# packages, from a copy of the venv with mypy added, so the image carries no compiler or mypy.
# The check (from /, not /src, so it imports the installed copy) fails the build if the
# gateway would run as plain Python.
COPY scripts/build_native.py ./scripts/build_native.py
RUN cp -a /opt/venv /opt/build-venv \
 && /opt/build-venv/bin/python -m pip install --no-cache-dir --quiet -c requirements-dev.lock mypy setuptools \
 && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && /opt/build-venv/bin/python scripts/build_native.py --strict --out "$site/.build/native" \
 && cd / && /opt/venv/bin/python -c 'import gateway.upstream.proxy as p; assert "/.build/native/" in p.__file__, p.__file__' \
 && rm -rf /opt/build-venv

# --- runtime ---------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
# tini is PID 1: it forwards SIGTERM to `llamagate serve` (which drains the gateway, then
# stops llama-server and the health process) and reaps orphaned processes. libgomp1: the
# OpenMP runtime llama-server links against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llamagate \
 && useradd --system --uid 10001 --gid llamagate --create-home --home-dir /home/llamagate \
      --shell /usr/sbin/nologin llamagate \
 && mkdir -p /data \
 && chown llamagate:llamagate /data \
 && chmod 700 /data
COPY --from=python /opt/python /opt/python
COPY --from=python /opt/venv /opt/venv
COPY --from=llama-server /usr/local/bin/llama-server /usr/local/bin/llama-server
COPY --from=llama-server /usr/local/share/llama-server-cmake-flags.txt /usr/local/share/
# DATA_DIR: the platform default for containers (/data) needs /.dockerenv, which containerd
# and Kubernetes do not create; set here, data lands on the volume under every runtime. Where
# the platform's volume is elsewhere, set DATA_DIR=/runpod-volume, /workspace, ...
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data \
    LLAMA_SERVER_PATH=/usr/local/bin/llama-server
USER 10001:10001
WORKDIR /home/llamagate
VOLUME /data
# gateway (PORT), health (PORT_HEALTH)
EXPOSE 8000 8001
# Healthy only on 200: 204 (loading the model) and 503 (unhealthy, draining) fail the check.
# start-period covers the default BACKEND_START_TIMEOUT (300 s) of a large model's load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('PORT_HEALTH', '8001'), timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "llamagate"]
CMD ["serve"]
