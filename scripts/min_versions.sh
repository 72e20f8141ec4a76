#!/usr/bin/env bash
# The test suite on the oldest dependencies pyproject.toml allows, installed as a user's
# `pip install` would, without the locks: a fresh virtualenv, each direct dependency at its
# floor (uv's --resolution lowest-direct), what those pull in at the newest their own ranges
# allow. A floor that is too low fails here, not on a user's machine.
#   scripts/min_versions.sh [PYTEST ARGS]     (default: the whole suite, tests/)
# The gateway runs as plain Python (LLAMAGATE_NATIVE=0): the compiled request path is built
# by `make setup` from the locked mypy, not from the floor's. Tests marked llama_server use
# the llama-server `make setup` built (LLAMA_SERVER_PATH or ~/.cache/llamagate).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/tools"
"$tmp/tools/bin/pip" install --quiet --disable-pip-version-check uv
uv="$tmp/tools/bin/uv"
"$uv" venv --quiet --python "$(command -v python3)" "$tmp/venv"
# a copy of the project: building it must not leave build/ or egg-info in the checkout
mkdir "$tmp/src"
cp -a pyproject.toml core fleet llamagate gateway health backend keys "$tmp/src/"
VIRTUAL_ENV="$tmp/venv" "$uv" pip install --quiet --resolution lowest-direct "$tmp/src[dev]"
echo "min-versions: the direct dependencies at their floors:"
VIRTUAL_ENV="$tmp/venv" "$uv" pip freeze --quiet | grep -iE "^($(
  "$tmp/venv/bin/python" - <<'PY'
import re, tomllib
data = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = data["dependencies"] + data["optional-dependencies"]["dev"]
print("|".join(re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].replace("_", "[-_]") for r in reqs))
PY
))==" | sed 's/^/  /'
# run from the root, the tests import the checkout's sources (first on sys.path), with the
# floors' libraries; the installed copy gives `llamagate --version` its version
cd "$root"
LLAMAGATE_NATIVE=0 "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
