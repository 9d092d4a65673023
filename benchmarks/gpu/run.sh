#!/usr/bin/env bash
# The GPU run in one call (about 5-8 minutes on an H200): the CUDA tests, greedy parity with transformers,
# offline and serving benchmarks; one table printed last, JSON and logs under $OUT.
#
# On the GPU machine (its own Python, torch + CUDA, Triton and transformers; no internet): inferd runs from
# this working tree through PYTHONPATH, and its other dependencies come as wheels in .whl/, which
# `benchmarks/gpu/prepare.sh` downloads on a machine that reaches PyPI. Dry run on a CPU:
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ] && compgen -G ".whl/*.whl" >/dev/null; then  # the wheels are for the GPU image (3.12)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 INFERD_CPU_KERNELS=${INFERD_CPU_KERNELS:-1}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu/bench.py --device "$DEVICE" --out "$OUT" ${QUICK:+--quick} 2>&1 | tee "$OUT/bench.log"
