"""The per-layer KV cache tensors: the model's dtype, or int8 levels with per-row scales.

A layer's cache is either one tensor `[2, blocks, block_size, kv_heads, head_dim]` in
the model's dtype (K at index 0, V at 1), or, with `kv_cache_dtype="int8"`, a
`QuantizedKV`: the same layout in int8 plus fp32 scales `[2, blocks, block_size,
kv_heads]`, one per token and head (absmax / 127, symmetric levels -127..127). A head
of 64 values then takes 68 bytes instead of 128 in bf16 (256 in fp32), so a given
`--kv-cache-bytes` holds 1.9x (3.8x) the tokens.

Rows are quantized when written (the CPU kernel `write_kv`, or `write` here with the
same arithmetic) and read in place by the decode attention kernel, which folds the
scales into the scores and the probabilities; the gathered path (prompt chunks, and
everything without the kernels) dequantizes the blocks it gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8")


@dataclass
class QuantizedKV:
    data: torch.Tensor    # [2, blocks, block_size, kv_heads, head_dim] int8
    scales: torch.Tensor  # [2, blocks, block_size, kv_heads] fp32

    @classmethod
    def zeros(cls, num_blocks: int, block_size: int, n_kv: int, head_dim: int, device) -> QuantizedKV:
        return cls(torch.zeros(2, num_blocks, block_size, n_kv, head_dim, dtype=torch.int8, device=device),
                   torch.zeros(2, num_blocks, block_size, n_kv, dtype=torch.float32, device=device))


def bytes_per_token(kv_cache_dtype: str, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token of one layer."""
    if kv_cache_dtype == "int8":
        return 2 * n_kv * (head_dim + 4)  # int8 levels and an fp32 scale per head
    return 2 * n_kv * head_dim * dtype.itemsize


def allocate(kv_cache_dtype: str, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
             dtype: torch.dtype, device) -> torch.Tensor | QuantizedKV:
    if kv_cache_dtype == "int8":
        return QuantizedKV.zeros(num_blocks, block_size, n_kv, head_dim, device)
    return torch.zeros(2, num_blocks, block_size, n_kv, head_dim, dtype=dtype, device=device)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 levels and fp32 scales of `x` [..., head_dim], one scale per row: the kernel's arithmetic."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, amax / 127.0


def write(cache: QuantizedKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize the new tokens' K/V [T, kv_heads, head_dim] into their cache slots."""
    n_kv, dim = cache.data.shape[-2], cache.data.shape[-1]
    for i, x in enumerate((k, v)):
        q, s = quantize(x)
        cache.data[i].view(-1, n_kv, dim).index_copy_(0, slots, q)
        cache.scales[i].view(-1, n_kv).index_copy_(0, slots, s)


def gather(cache: QuantizedKV, which: int, tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K (which=0) or V (1) of the blocks in `tables` [b, max_blocks], dequantized to `dtype`:
    [b, max_blocks, block_size, kv_heads, head_dim]."""
    return (cache.data[which][tables].float() * cache.scales[which][tables][..., None]).to(dtype)
