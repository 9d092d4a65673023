"""RMSNorm with the residual add, rotary embedding and SiLU-and-multiply: one kernel each, rounding
as torch does.

`rms_norm` adds x into the residual in the model's dtype (HF's `h = h + x`, written
back in place), normalizes in fp32, casts, then multiplies by the weight in the
model's dtype: layers/norm.py's sequence in one launch instead of five. `rope`
rotates q and k in place (rotate-half form, layers/rope.py): each product and sum
rounded to the model's dtype as torch's eager ops round them, so in bf16 the bits
are torch's. `silu_and_mul` is layers/activation.py's `silu(gate) * up` in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out_ptr, x_ptr, res_ptr, w_ptr, eps, stride_o, stride_x, stride_r, N: tl.constexpr,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < N
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + c, mask=ok, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + c, x, mask=ok)
    h = x.to(tl.float32)
    var = tl.sum(h * h, 0) / N
    y = (h * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + c, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + c, (w.to(tl.float32) * y.to(tl.float32)).to(dtype), mask=ok)


def rms_norm(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> None:
    """out [T, N] = RMSNorm(residual + x) * weight; residual, when given, becomes residual + x."""
    n = x.shape[-1]
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](out, x, res, weight, eps, out.stride(0), x.stride(0), res.stride(0),
                                    N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None)


@triton.jit
def _rotate_heads(ptr, stride_t, stride_h, row, cos, sin, N_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    ok = (h < N_HEADS) & (i < HALF)
    base = ptr + row * stride_t + h * stride_h + i
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # each product and sum rounded to the dtype, as the eager ops do (and no fused multiply-add)
    a = (x1 * cos).to(dt).to(tl.float32)
    b = (x2 * sin).to(dt).to(tl.float32)
    c = (x2 * cos).to(dt).to(tl.float32)
    e = (x1 * sin).to(dt).to(tl.float32)
    tl.store(base, (a - b).to(dt), mask=ok)
    tl.store(base + HALF, (c + e).to(dt), mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                 N_HEADS: tl.constexpr, N_KV: tl.constexpr, Q_PAD: tl.constexpr, KV_PAD: tl.constexpr,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_ptr + row * stride_c + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_c + i, mask=i < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, row, cos, sin, N_HEADS, Q_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, stride_kt, stride_kh, row, cos, sin, N_KV, KV_PAD, HALF, HALF_PAD)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by the step's tables cos, sin [T, D/2]."""
    half = q.shape[-1] // 2
    _rope_kernel[(q.shape[0],)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                cos.stride(0), N_HEADS=q.shape[1], N_KV=k.shape[1],
                                Q_PAD=triton.next_power_of_2(q.shape[1]), KV_PAD=triton.next_power_of_2(k.shape[1]),
                                HALF=half, HALF_PAD=triton.next_power_of_2(half))


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_o, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < N
    gate = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + c, mask=ok, other=0.0)
    dt = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt)          # torch's silu: fp32 math, rounded to the dtype
    tl.store(out_ptr + row * stride_o + c, (act.to(tl.float32) * up.to(tl.float32)).to(dt), mask=ok)


def silu_and_mul(out: torch.Tensor, gate_up: torch.Tensor) -> None:
    """out [T, n] = silu(gate_up[:, :n]) * gate_up[:, n:]."""
    n = out.shape[-1]
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(gate_up.shape[0], triton.cdiv(n, block))](out, gate_up, out.stride(0), gate_up.stride(0),
                                                                   N=n, BLOCK=block)
