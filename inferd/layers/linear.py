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

from inferd.layers import quant_blocks
from inferd.layers.cpu_kernels import ops_for

# measured crossovers of the weight-only kernels against bf16 on CPU (docs/benchmarks.md)
INT8_MAX_ROWS = 3
INT4_MAX_ROWS = 16
INT4_GROUP = 32


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
        self.q4weight: torch.Tensor | None = None  # packed int4 copy, see quantize_int4
        self.q4scales: torch.Tensor | None = None
        self.q4group = INT4_GROUP
        self.packed: quant_blocks.PackedWeight | None = None  # a GGUF file's own blocks, see use_blocks

    def use_blocks(self, packed: quant_blocks.PackedWeight, keep_weight: bool = False) -> None:
        """Compute with a GGUF file's quantized blocks, for every batch size (layers/quant_blocks.py).
        The float weight is dropped unless `keep_weight` (an output head tied to the embedding)."""
        if (packed.out_features, packed.in_features) != tuple(self.weight.shape):
            raise ValueError(f"packed weight {packed.out_features}x{packed.in_features} "
                             f"!= layer {tuple(self.weight.shape)}")
        self.packed = packed
        if not keep_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def quantize_int8(self) -> None:
        """Keep an int8 copy of the weight (per-output-row absmax scales) next to it.

        A matmul with few rows is bound by reading the weight, and
        `_weight_int8pack_mm` reads half the bytes: about 2x faster than bf16 at 1-2
        rows on CPU, slower from ~4 rows on, so forward picks per call."""
        w = self.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.qscale = scale.to(self.weight.dtype)

    def quantize_int4(self, group_size: int = INT4_GROUP) -> None:
        """Keep a 4-bit copy of the weight: per group of `group_size` inputs, 16 levels
        from the group's min to its max (the scheme of GGUF's Q4_1, so the weights of a
        Q4_1 file land back on their own levels, up to the bf16 rounding they went
        through). `_weight_int4pack_mm_for_cpu` reads a quarter of bf16's bytes and
        beats bf16 up to ~16 rows on CPU; larger batches keep bf16."""
        w = self.weight.detach().float()
        out_f, in_f = w.shape
        if in_f % group_size or out_f % 8:
            return  # the packed layout needs these; such a layer stays bf16
        groups = w.view(out_f, in_f // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-10)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.q4weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).view(out_f, in_f), 1)
        # the kernel computes (q - 8) * scale + zero: zero = low + 8 * scale
        self.q4scales = (torch.stack([scale, low + 8 * scale], -1).transpose(0, 1)
                         .contiguous().to(self.weight.dtype))
        self.q4group = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            ops = ops_for(x)
            if ops is not None:
                out = quant_blocks.matmul(ops, x, self.packed)
            else:  # kernels off (tests compare): the same weights in floats
                out = F.linear(x, self.packed.dequantize().to(x.dtype))
            return out if self.bias is None else out + self.bias
        if self.q4weight is not None and x.shape[0] <= INT4_MAX_ROWS:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q4weight, self.q4group, self.q4scales)
            return out if self.bias is None else out + self.bias
        if self.qweight is not None and x.shape[0] <= INT8_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.qscale)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)



class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
