"""Which x86 instruction set the CPU code may use, and how to pretend it has less.

Machines differ: some CPUs have AVX-512 with bf16, others only AVX2. Two choices
follow from that, and both read the CPU here: the default dtype (bf16 only where
the CPU computes it natively) and the `-march` the fused kernels are compiled
with. `ATEN_CPU_CAPABILITY` is torch's own switch for its kernels (`default`,
`avx2`, `avx512`); inferd honours it as well, so setting it to `avx2` on an
AVX-512 machine runs the whole engine as it would run on an AVX2-only CPU:
torch's AVX2 kernels, the float32 default, and the fused kernels built for
x86-64-v3 (AVX2 + FMA, no AVX-512) in a separate cache entry.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def forced_capability() -> str | None:
    """The instruction set asked for with ATEN_CPU_CAPABILITY, lower-cased, if any."""
    value = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return value or None


def avx512_allowed() -> bool:
    """AVX-512 code may run: the CPU has it and nothing forces a smaller set."""
    forced = forced_capability()
    return "avx512f" in cpu_flags() and (forced is None or forced.startswith("avx512"))


def has_native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX-512 BF16 or AMX) and may use it."""
    flags = cpu_flags()
    return avx512_allowed() and ("avx512_bf16" in flags or "amx_bf16" in flags)


def kernel_march() -> str:
    """The -march the fused kernels are compiled with."""
    forced = forced_capability()
    if forced == "avx2":
        return "-march=x86-64-v3"
    if forced == "default":
        return "-march=x86-64"
    return "-march=native"
