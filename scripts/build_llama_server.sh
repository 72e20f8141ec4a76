#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist, and cache the binary outside the repo.
#
#   scripts/build_llama_server.sh          # CPU build
#   CUDA=1 scripts/build_llama_server.sh   # CUDA build (-DGGML_CUDA=ON)
#   scripts/build_llama_server.sh --print-path   # print the cached path, build nothing
#
# The cache key is the sdist version plus a hash of the CMake flags, so CPU and
# CUDA builds (or different flag sets) live side by side and are reused by make,
# the tests and CI. Prints the binary's path as its last line of stdout.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CUDA="${CUDA:-0}"
CACHE_DIR="${LLAMAGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamagate}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_OPENSSL=OFF
)
if [[ "$CUDA" == "1" ]]; then
  flags+=(-DGGML_CUDA=ON -DGGML_NATIVE=OFF "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-80;86;89;90}")
else
  # NATIVE=ON tunes for this CPU; the cache lives on this machine, and images set
  # GGML_NATIVE=OFF through EXTRA_CMAKE_FLAGS.
  flags+=(-DGGML_NATIVE="${GGML_NATIVE:-ON}")
fi
# shellcheck disable=SC2206
[[ -n "${EXTRA_CMAKE_FLAGS:-}" ]] && flags+=(${EXTRA_CMAKE_FLAGS})

key="$(printf '%s\n' "${flags[@]}" | sha256sum | cut -c1-12)"
variant="cpu"; [[ "$CUDA" == "1" ]] && variant="cuda"
dest="$CACHE_DIR/llama-server-$LLAMA_CPP_PYTHON_VERSION-$variant-$key"
bin="$dest/llama-server"

if [[ "${1:-}" == "--print-path" ]]; then echo "$bin"; exit 0; fi
if [[ -x "$bin" ]]; then echo "$bin"; exit 0; fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=("a C++ compiler (g++)")
command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 || missing+=(make)
if [[ "$CUDA" == "1" ]]; then command -v nvcc >/dev/null 2>&1 || missing+=("the CUDA toolkit (nvcc)"); fi
if (( ${#missing[@]} )); then
  echo "error: building llama-server needs: ${missing[*]}." >&2
  echo "       On Debian/Ubuntu: apt-get install -y cmake build-essential" >&2
  echo "       Or point LLAMA_SERVER_PATH at an existing llama-server binary." >&2
  exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/llamagate-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo ">> downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist" >&2
# pip reads an sdist's metadata through its build backend. Its own isolated build
# environment would build that backend and its dependencies from source (--no-binary
# applies to them too), so put the backend's wheel on the path and skip isolation.
"$PYTHON" -m pip install --quiet --target "$work/backend" "scikit-build-core[pyproject]>=0.9.2" >&2 \
  && PYTHONPATH="$work/backend" "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
       --no-build-isolation "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" >&2 \
  || "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
       "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"

echo ">> configuring ($variant, key $key)" >&2
gen=(); command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake -S "$src" -B "$work/build" "${gen[@]}" "${flags[@]}" >"$work/configure.log" 2>&1 \
  || { tail -n 40 "$work/configure.log" >&2; echo "error: cmake configure failed" >&2; exit 1; }
echo ">> building llama-server with $JOBS jobs (takes minutes on a small machine)" >&2
cmake --build "$work/build" --target llama-server -j "$JOBS" >"$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log" >&2; echo "error: llama-server build failed" >&2; exit 1; }

mkdir -p "$dest.tmp"
cp "$work/build/bin/llama-server" "$dest.tmp/llama-server"
# With -DBUILD_SHARED_LIBS=ON (the CPU image's GGML_BACKEND_DL build) llama-server needs the
# libraries and the backend modules built beside it; -P keeps their version links.
find "$work/build/bin" -maxdepth 1 -name '*.so*' -exec cp -P {} "$dest.tmp/" \;
printf '%s\n' "${flags[@]}" >"$dest.tmp/cmake-flags.txt"
echo "$LLAMA_CPP_PYTHON_VERSION" >"$dest.tmp/llama-cpp-python-version.txt"
rm -rf "$dest"; mv "$dest.tmp" "$dest"
echo "$bin"
