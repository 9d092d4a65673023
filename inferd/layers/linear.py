"""Weight-holding layers that allocate without initializing.

Model weights always come from a checkpoint, so random initialization (and the
meta-device detour that avoids it, which imports a large part of torch at start-up)
is wasted time. These layers take dtype and device up front and allocate with
`torch.empty`; the loader then copies every weight in and checks none is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

        self.qweight: torch.Tensor | None = None   # int8 copy for small batches, see quantize_int8
        self.qscale: torch.Tensor | None = None

    def quantize_int8(self) -> None:
        """Keep an int8 copy of the weight (per-output-row absmax scales) next to it.

        A matmul with few rows is bound by reading the weight, and
        `_weight_int8pack_mm` reads half the bytes: about 2x faster than bf16 at 1-2
        rows on CPU, slower from ~4 rows on, so forward picks per call."""
        w = self.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.qscale = scale.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None and x.shape[0] <= INT8_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.qscale)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


# measured crossover of the int8 weight-only kernel against bf16 on CPU (benchmarks/)
INT8_MAX_ROWS = 3


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
