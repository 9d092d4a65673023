"""Each build of the CPU kernels against the reference, whatever CPU runs the suite.

The kernels are compiled for the CPU they run on (`-march=native`); on an AVX-512 machine that
build never runs the loops an AVX2-only CPU gets. This test builds the AVX2 variant too
(`ATEN_CPU_CAPABILITY=avx2`: `-march=x86-64-v3`, no AVX-512, its own cache entry; torch's AVX2
kernels and oneDNN's AVX2 code alike) and runs the kernel tests against it in a subprocess. On an
AVX2-only machine the suite's own run is that variant already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferd.layers import cpu_isa

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif("avx512f" not in cpu_isa.cpu_flags(), reason="the suite's own run is the AVX2 variant here")
def test_the_avx2_kernel_build_passes_the_kernel_tests(kernels):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "INFERD_REQUIRE_CPU_KERNELS": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "from inferd.layers import cpu_isa, cpu_kernels; "
                               "print(cpu_isa.kernel_march(), cpu_kernels.load() is not None)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.split() == ["-march=x86-64-v3", "True"], probe.stderr[-2000:]
    # the kernel-level tests (the engine-level ones load whole models and add little here)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/layers/test_cpu_kernels.py",
         "tests/layers/test_kv_int8.py", "tests/layers/test_quant_matmul.py", "-k", "not engine and not fused and not installs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


# the GGUF-block matmul over every kind and a few batch sizes, as one digest of its output bits
_DIGEST = """
import hashlib, torch
from inferd.layers import cpu_kernels, quant_blocks
from tests.layers.test_quant_matmul import KINDS, random_blocks
ops = cpu_kernels.load()
h = hashlib.sha256()
for kind in KINDS:
    w = quant_blocks.pack(random_blocks(kind, 80, 192, seed=3), kind, (80, 192))
    for rows in (1, 5, 16):
        x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
        h.update(quant_blocks.matmul(ops, x, w).numpy().tobytes())
print(ops.quant_matmul_path(), h.hexdigest())
"""


@pytest.mark.skipif("avx512f" not in cpu_isa.cpu_flags(), reason="needs a CPU with AVX-512 to compare builds")
def test_the_avx2_and_avx512_builds_give_the_same_bits(kernels):
    """The integer block sums are exact and the fp32 steps are the same on every path, so the
    instruction set a machine has does not change a model's logits (16 rows: AMX tiles where
    the CPU has them)."""
    digests = {}
    for capability in ("avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "INFERD_REQUIRE_CPU_KERNELS": "1"}
        run = subprocess.run([sys.executable, "-c", _DIGEST], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        path, digest = run.stdout.split()
        digests[path] = digest
    assert len(digests) == 2 and "avx2" in digests, digests  # the other: avx512 (or amx where it may run)
    assert len(set(digests.values())) == 1, digests
