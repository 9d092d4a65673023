"""The KV-cache write: each new token's K and V into its cache slot, quantized when the cache is.

One program per token. Slots below zero are padding (a CUDA graph's unused rows) and
write nothing. An int8 / fp8 cache gets levels and one fp32 scale per head with the
arithmetic of layers/kv_storage.quantize: scale = absmax / top, level = x * (top /
absmax), rounded half to even to the storage's precision (for fp8 before the cast, so the
cast is exact and the result does not depend on how a backend rounds it), clamped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TOP = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@triton.jit
def _round_half_even(x):
    """torch.round: floor plus one where the fraction is over a half, or a half and the floor is odd
    (x - floor(x) is exact for these magnitudes)."""
    low = tl.floor(x)
    frac = x - low
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), low + 1.0, low)


@triton.jit
def _e4m3_step(x):
    """The spacing of float8 e4m3 values around |x|: 2^(exponent - 3), subnormals below 2^-6."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    return ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _store_rows(src_ptr, stride_t, stride_h, cache_ptr, scale_ptr, token, block, within,
                stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                QUANTIZED: tl.constexpr, ROUND: tl.constexpr, TOP: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, DIM_PAD)
    ok = (h < N_KV)[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(src_ptr + token * stride_t + h[:, None] * stride_h + d[None, :], mask=ok, other=0.0)
    dst = cache_ptr + block * stride_cb + within * stride_cs + h[:, None] * stride_ch + d[None, :]
    if QUANTIZED:
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), 1)
        inv = tl.where(amax > 0, TOP / amax, 0.0)
        scaled = xf * inv[:, None]
        if ROUND:
            scaled = _round_half_even(scaled)
        else:
            step = _e4m3_step(scaled)
            scaled = _round_half_even(scaled / step) * step
        scaled = tl.minimum(tl.maximum(scaled, -TOP), TOP)
        tl.store(dst, scaled.to(cache_ptr.dtype.element_ty), mask=ok)
        tl.store(scale_ptr + block * stride_sb + within * stride_ss + h * stride_sh, amax / TOP, mask=h < N_KV)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slots_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                     BLOCK_SIZE: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                     QUANTIZED: tl.constexpr, ROUND: tl.constexpr, TOP: tl.constexpr):
    """ROUND: int8 levels (whole numbers); otherwise float8 e4m3 values."""
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        within = slot % BLOCK_SIZE
        _store_rows(k_ptr, stride_kt, stride_kh, k_cache_ptr, k_scale_ptr, token, block, within,
                    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                    N_KV, HEAD_DIM, HEADS_PAD, DIM_PAD, QUANTIZED, ROUND, TOP)
        _store_rows(v_ptr, stride_vt, stride_vh, v_cache_ptr, v_scale_ptr, token, block, within,
                    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                    N_KV, HEAD_DIM, HEADS_PAD, DIM_PAD, QUANTIZED, ROUND, TOP)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, k_scales: torch.Tensor | None = None,
             v_scales: torch.Tensor | None = None) -> None:
    """k, v [T, KVH, D] (rows may be strided views) into caches [blocks, block_size, KVH, D] at
    `slots` [T]; scales [blocks, block_size, KVH] when the caches hold int8 / fp8 levels."""
    n_kv, head_dim = k.shape[1], k.shape[2]
    quantized = k_scales is not None
    ks = k_scales if quantized else k_cache
    vs = v_scales if quantized else v_cache
    scale_strides = (ks.stride(0), ks.stride(1), ks.stride(2)) if quantized else (0, 0, 0)
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, ks, vs, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
        BLOCK_SIZE=k_cache.shape[1], N_KV=n_kv, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(n_kv), DIM_PAD=triton.next_power_of_2(head_dim),
        QUANTIZED=quantized, ROUND=k_cache.dtype == torch.int8, TOP=_TOP.get(k_cache.dtype, 0.0),
    )
