"""RMSNorm computed in fp32 and cast back, exactly as HF Llama does it.

`forward(x, residual)` first adds x into the residual stream (in the model's dtype,
as HF's `h = h + x` does) and returns (normed, new residual): on the CPU one fused
kernel does both and updates the residual in place (see layers/cpu_kernels.py), and on
a GPU one Triton kernel (layers/triton_ops).
"""

from __future__ import annotations

import torch

from inferd.layers import triton_ops
from inferd.layers.cpu_kernels import ops_for


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = (ops_for(x) or triton_ops.for_tensor(x)) if x.dim() == 2 else None
        if ops is not None:
            out = torch.empty_like(x)
            ops.rms_norm(out, x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = residual = residual + x
        # one fused kernel for the fp32 normalization (the same arithmetic as HF's
        # pow/mean/rsqrt sequence), then the cast and the weight, as HF applies them
        h = torch.nn.functional.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
