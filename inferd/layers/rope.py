"""Rotary position embeddings (the rotate-half form used by HF Llama/Qwen).

Frequencies follow the model's `rope_scaling`: none, `linear`, or `llama3` (the
smooth low/high-frequency blend Llama 3.1+ uses). cos/sin tables are built once for
the model's context length and indexed by absolute position, so a chunk of a
prompt, a decode token and a recomputed request all rotate the same way. Each
step looks its positions up once (`tables`) and every layer reuses the result.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from inferd.layers import triton_ops
from inferd.layers.cpu_kernels import ops_for


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # [max_pos, head_dim/2] each; kept in fp32 and cast per call to q's dtype
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a step's positions, [T, D/2]; built once and shared by all layers."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor,
               tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: [T, heads, D] and k: [T, kv_heads, D] by the step's tables
    (rotate-half form). On the CPU one fused kernel rotates both in place, on a GPU one Triton kernel."""
    ops = ops_for(q) or triton_ops.for_tensor(q)
    if ops is not None:
        ops.rope(q, k, *tables)
        return q, k
    return _rotate(q, tables), _rotate(k, tables)


def _rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = tables[0].unsqueeze(1), tables[1].unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
