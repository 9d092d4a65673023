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
         "tests/layers/test_kv_int8.py", "-k", "not engine and not fused and not installs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
