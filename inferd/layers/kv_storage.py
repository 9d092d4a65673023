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

`fp8` (vLLM's name, for GPUs that compute in it) is the same scheme with float8 e4m3
values instead of int8 levels (absmax / 448 per row): the same bytes, more precision
near zero, less at the top. It runs on the gathered torch path on every device (the
CPU kernels read int8 only), so on the CPU int8 is the one to use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
_LEVELS = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest value of each storage type


@dataclass
class QuantizedKV:
    data: torch.Tensor    # [2, blocks, block_size, kv_heads, head_dim] int8 or float8_e4m3fn
    scales: torch.Tensor  # [2, blocks, block_size, kv_heads] fp32

    @classmethod
    def zeros(cls, num_blocks: int, block_size: int, n_kv: int, head_dim: int, device,
              dtype: torch.dtype = torch.int8) -> QuantizedKV:
        return cls(torch.zeros(2, num_blocks, block_size, n_kv, head_dim, dtype=dtype, device=device),
                   torch.zeros(2, num_blocks, block_size, n_kv, dtype=torch.float32, device=device))

    @property
    def in_kernel_form(self) -> bool:
        """Whether the CPU kernels read it in place (int8); fp8 takes the gathered torch path."""
        return self.data.dtype == torch.int8


def bytes_per_token(kv_cache_dtype: str, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token of one layer."""
    if kv_cache_dtype in ("int8", "fp8"):
        return 2 * n_kv * (head_dim + 4)  # one byte a value and an fp32 scale per head
    return 2 * n_kv * head_dim * dtype.itemsize


def allocate(kv_cache_dtype: str, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
             dtype: torch.dtype, device) -> torch.Tensor | QuantizedKV:
    if kv_cache_dtype in ("int8", "fp8"):
        storage = torch.int8 if kv_cache_dtype == "int8" else torch.float8_e4m3fn
        return QuantizedKV.zeros(num_blocks, block_size, n_kv, head_dim, device, storage)
    return torch.zeros(2, num_blocks, block_size, n_kv, head_dim, dtype=dtype, device=device)


def quantize(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Values in `dtype` and fp32 scales of `x` [..., head_dim], one scale per row (int8: the
    kernel's arithmetic)."""
    top = _LEVELS[dtype]
    xf = x.float()
    amax = xf.abs().amax(-1)
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    scaled = xf * inv[..., None]
    if dtype == torch.int8:
        scaled = torch.round(scaled)  # fp8's cast rounds to its own nearest value
    return scaled.clamp_(-top, top).to(dtype), amax / top


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 as raw bytes: index_copy_ and indexing are not implemented for float8 types everywhere."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def write(cache: QuantizedKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize the new tokens' K/V [T, kv_heads, head_dim] into their cache slots."""
    n_kv, dim = cache.data.shape[-2], cache.data.shape[-1]
    for i, x in enumerate((k, v)):
        q, s = quantize(x, cache.data.dtype)
        _bytes(cache.data[i]).view(-1, n_kv, dim).index_copy_(0, slots, _bytes(q))
        cache.scales[i].view(-1, n_kv).index_copy_(0, slots, s)


def gather(cache: QuantizedKV, which: int, tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K (which=0) or V (1) of the blocks in `tables` [b, max_blocks], dequantized to `dtype`:
    [b, max_blocks, block_size, kv_heads, head_dim]."""
    values = _bytes(cache.data[which])[tables].view(cache.data.dtype)
    return (values.float() * cache.scales[which][tables][..., None]).to(dtype)
