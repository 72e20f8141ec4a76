#!/usr/bin/env bash
# Rewrites the two hashed locks from pyproject.toml (`make lock`), with uv installed into a
# throwaway virtualenv:
#   requirements.lock      the runtime dependencies (what the images install)
#   requirements-dev.lock  the same pins plus the dev extra (tests, mypy, ruff: `make setup`)
# Pins already in a lock are kept while pyproject.toml allows them; UPGRADE=1 takes the newest
# allowed versions instead. Every file of each pinned version is hashed (--universal: the
# arm64 and x86_64 images, every platform marker), and pip installs them with --require-hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/tools"
"$tmp/tools/bin/pip" install --quiet --disable-pip-version-check uv
uv="$tmp/tools/bin/uv"
options=(--universal --python-version 3.11 --generate-hashes --quiet)
if [ "${UPGRADE:-0}" = 1 ]; then options+=(--upgrade); fi
"$uv" pip compile pyproject.toml "${options[@]}" -o requirements.lock
# the runtime lock as constraints: the dev lock pins every runtime package as the images do
"$uv" pip compile pyproject.toml --extra dev -c requirements.lock "${options[@]}" -o requirements-dev.lock
