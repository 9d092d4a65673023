#!/usr/bin/env bash
# Build llama.cpp's `llama-server` as a benchmark peer for inferd (NOT run by CI).
#
# Where the source comes from: the llama.cpp repository itself cannot be reached from
# machines that only see package registries, but the `llama-cpp-python` source
# distribution on PyPI vendors a full llama.cpp tree under vendor/llama.cpp. This
# script downloads that sdist with pip, unpacks it, and builds only the
# `llama-server` target with cmake (CPU, native ISA, no libcurl, Release).
#
#   benchmarks/peers/build_llama_cpp.sh                 # default version, -j2
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 JOBS=4 benchmarks/peers/build_llama_cpp.sh
#
# Output: benchmarks/peers/bin/llama-server (plus the shared libraries it links,
# with an $ORIGIN rpath, so the binary runs from bin/), and
# benchmarks/peers/bin/VERSION naming the sdist and the vendored llama.cpp commit.
# Work files go to benchmarks/peers/build/. Both directories are gitignored.
# Needs: python3 + pip, cmake >= 3.14, a C/C++ compiler (apt-get install cmake build-essential).
# Takes about 20 minutes on 2 cores (18 of them compiling).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="$HERE/build"
BIN="$HERE/bin"
PY="${PYTHON:-python3}"

mkdir -p "$BUILD" "$BIN"
SDIST="$BUILD/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    echo "== downloading llama-cpp-python==$VERSION (sdist)"
    "$PY" -m pip download --no-deps --no-binary :all: --dest "$BUILD" "llama-cpp-python==$VERSION"
fi
SRC="$BUILD/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    echo "== unpacking $SDIST"
    tar -xzf "$SDIST" -C "$BUILD"
fi
LLAMA="$SRC/vendor/llama.cpp"
[ -f "$LLAMA/CMakeLists.txt" ] || { echo "no llama.cpp tree at $LLAMA" >&2; exit 1; }

echo "== configuring $LLAMA"
cmake -S "$LLAMA" -B "$BUILD/cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DCMAKE_BUILD_RPATH='$ORIGIN' \
    -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$BUILD/cmake/bin" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$BUILD/cmake/bin"

echo "== building llama-server with $JOBS jobs"
start=$(date +%s)
cmake --build "$BUILD/cmake" --config Release --target llama-server -j"$JOBS"
echo "== build took $(( $(date +%s) - start )) s"

cp -a "$BUILD/cmake/bin/llama-server" "$BIN/"
# shared libraries (libllama, libggml*, libmtmd ...) when built shared
find "$BUILD/cmake" -name '*.so*' \( -type f -o -type l \) -exec cp -a {} "$BIN/" \;
{
    echo "llama-cpp-python $VERSION"
    "$BIN/llama-server" --version 2>&1 | grep -E '^(version|built with)' || true
} > "$BIN/VERSION"
echo "== done: $BIN/llama-server"
cat "$BIN/VERSION"
