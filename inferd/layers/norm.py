"""RMSNorm computed in fp32 and cast back, exactly as HF Llama does it."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel for the fp32 normalization (the same arithmetic as HF's
        # pow/mean/rsqrt sequence), then the cast and the weight, as HF applies them
        h = torch.nn.functional.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * h.to(x.dtype)
