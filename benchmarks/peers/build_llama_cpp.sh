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
#   ISA=avx2 benchmarks/peers/build_llama_cpp.sh        # AVX2 + FMA + F16C only, into bin-avx2/
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
CMAKE_DIR="$BUILD/cmake"
ISA_FLAGS=(-DGGML_NATIVE=ON)
if [ "${ISA:-native}" = "avx2" ]; then
    # what an AVX2-only CPU gets: llama.cpp's AVX2 kernels, none of its AVX-512/AMX code
    BIN="$HERE/bin-avx2"
    CMAKE_DIR="$BUILD/cmake-avx2"
    ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF
               -DGGML_AMX_INT8=OFF -DGGML_AVX_VNNI=OFF)
fi
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
cmake -S "$LLAMA" -B "$CMAKE_DIR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF \
    "${ISA_FLAGS[@]}" \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DCMAKE_BUILD_RPATH='$ORIGIN' \
    -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$CMAKE_DIR/bin" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$CMAKE_DIR/bin"

echo "== building llama-server with $JOBS jobs"
start=$(date +%s)
mkdir -p "$BIN"
cmake --build "$CMAKE_DIR" --config Release --target llama-server -j"$JOBS"
echo "== build took $(( $(date +%s) - start )) s"

cp -a "$CMAKE_DIR/bin/llama-server" "$BIN/"
# shared libraries (libllama, libggml*, libmtmd ...) when built shared
find "$CMAKE_DIR" -name '*.so*' \( -type f -o -type l \) -exec cp -a {} "$BIN/" \;
{
    echo "llama-cpp-python $VERSION"
    "$BIN/llama-server" --version 2>&1 | grep -E '^(version|built with)' || true
} > "$BIN/VERSION"
echo "== done: $BIN/llama-server"
cat "$BIN/VERSION"
