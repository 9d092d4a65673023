"""SiLU-and-multiply, the gated MLP's activation (SwiGLU): silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.layers import triton_ops
from inferd.layers.cpu_kernels import ops_for


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [rows, 2 * n] (gate first) -> [rows, n]; one fused kernel on the CPU, and on a GPU."""
    n = gate_up.shape[-1] // 2
    ops = (ops_for(gate_up) or triton_ops.for_tensor(gate_up)) if gate_up.dim() == 2 else None
    if ops is not None:
        out = gate_up.new_empty(gate_up.shape[0], n)
        ops.silu_and_mul(out, gate_up)
        return out
    gate, up = gate_up.split(n, dim=-1)
    return F.silu(gate) * up
