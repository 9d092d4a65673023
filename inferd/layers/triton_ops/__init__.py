"""Triton kernels for the CUDA path: paged attention, the KV-cache write, RMSNorm+residual, rope,
SiLU-and-multiply.

Each kernel does the arithmetic of the torch code it replaces (layers/attention.py,
layers/kv_storage.py, layers/norm.py, layers/rope.py,
layers/activation.py) with fewer launches and without
the padded copy of the cache: a decode step of a small model is launch-bound on a GPU,
and each of these folds several torch ops into one kernel.

`for_tensor(x)` returns this package's launchers (`kernels()`) for a CUDA tensor when
Triton is installed, else None, and the caller takes its torch path. The kernel
modules are imported on first use: `triton.jit` reads `TRITON_INTERPRET` when a kernel
is defined, and the CPU tests set it to run the kernels in Triton's interpreter
(tests/layers/triton/).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import torch

_enabled = os.environ.get("INFERD_TRITON", "1") != "0"
_kernels: SimpleNamespace | None = None


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def enabled() -> bool:
    """Whether the CUDA path uses these kernels: Triton installed and not turned off."""
    return _enabled and installed()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels() -> SimpleNamespace:
    """The launchers, imported (and so defined, for the GPU or the interpreter) on first use."""
    global _kernels
    if _kernels is None:
        from inferd.layers.triton_ops import fused_ops, kv_write, paged_attention
        _kernels = SimpleNamespace(write_kv=kv_write.write_kv, paged_attention=paged_attention.paged_attention,
                                   rms_norm=fused_ops.rms_norm, rope=fused_ops.rope,
                                   silu_and_mul=fused_ops.silu_and_mul)
    return _kernels


def for_tensor(x: torch.Tensor) -> SimpleNamespace | None:
    """The kernels for a tensor on a CUDA device, None elsewhere or when they are off
    (INFERD_TRITON=0, or no Triton)."""
    if x.device.type != "cuda" or not enabled():
        return None
    return kernels()
