"""One paged attention kernel for every step: decodes, prompt chunks and drafts alike.

The flat batch holds each request's new tokens end to end (`query_start`, as in
layers/attention.py); a request's keys live in the cache blocks its row of
`block_tables` names. The kernel is launched over (tiles, KV heads): a tile is up to
`block_q` consecutive new tokens of one request, and its program attends the query
heads that share one KV head for those tokens (`block_q * group` rows of one matrix
product), so GQA reads each K/V block once for the whole group. Keys are read through
the block table in place, `block_n` positions at a time, with an online softmax in
fp32; a query sees the cached prefix and the new tokens up to its own position.

int8 / fp8 caches (layers/kv_storage.py) are read as levels with one scale per token
and head: the K scale multiplies the scores and the V scale the probabilities, so the
matrix products run on the levels (exact in bf16) and no dequantized copy is made.

Tiles are built on the host (`tiles`), so the kernel needs no search for its request.
A step with no prompt tokens has one tile per request, which is what lets a captured
CUDA graph (engine/core/cuda_graphs.py) keep its launch grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
    tables_ptr, seq_lens_ptr, query_start_ptr, tiles_ptr,
    scale, num_tiles,
    stride_qt, stride_qh, stride_ot,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_sb, stride_ss, stride_sh,
    stride_table,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    QUANTIZED: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tiles_ptr + tile)
    q0 = tl.load(tiles_ptr + num_tiles + tile)           # the tile's first token within its request
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    cached = seq_len - q_len                               # positions before this step's tokens

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // GROUP_PAD                            # token within the request
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (qi < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = cached + qi
    d = tl.arange(0, DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # finite start: a tile whose keys are all masked gives p = 0 rather than exp(nan)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    kv_end = tl.minimum(seq_len, cached + q0 + BLOCK_Q)    # the tile's last query sees no further
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        block = tl.load(tables_ptr + req * stride_table + n // BLOCK_SIZE, mask=n_ok, other=0)
        within = n % BLOCK_SIZE
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kb + within[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + block[:, None] * stride_vb + within[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :], mask=kv_ok, other=0.0)
        if QUANTIZED:
            scale_at = block * stride_sb + within * stride_ss + kv_head * stride_sh
            k_scale = tl.load(k_scale_ptr + scale_at, mask=n_ok, other=0.0)
            v_scale = tl.load(v_scale_ptr + scale_at, mask=n_ok, other=0.0)
            k = k.to(q.dtype)   # the levels are exact in the activations' dtype
            v = v.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if QUANTIZED:
            s = s * k_scale[None, :]
        s = s * scale
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANTIZED:
            p = p * v_scale[None, :]
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + qi)[:, None] * stride_ot + head[:, None] * HEAD_DIM + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def tile_rows(block_q: int, group: int) -> int:
    return block_q * triton.next_power_of_2(group)


def block_q_for(group: int, prompt: bool) -> int:
    """Tokens per tile: enough rows for the matrix units (16 at least), more for prompt chunks,
    whose tokens share their keys."""
    rows = 64 if prompt else 16
    return max(1, rows // triton.next_power_of_2(group))


def tiles(query_lens: list[int], block_q: int) -> list[list[int]]:
    """[requests, first tokens] of the launch's tiles: each request's new tokens cut into block_q."""
    reqs: list[int] = []
    firsts: list[int] = []
    for r, n in enumerate(query_lens):
        starts = range(0, max(n, 1), block_q)
        reqs.extend([r] * len(starts))
        firsts.extend(starts)
    return [reqs, firsts]


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                    tile_map: torch.Tensor, block_q: int, scale: float, block_n: int = 32) -> None:
    """out [T, H*D] = attention of q [T, H, D] over the paged caches [blocks, block_size, KVH, D].
    `tile_map` [2, tiles] (see `tiles`), `query_start` [B+1], `seq_lens` [B], `block_tables` [B, W];
    scales [blocks, block_size, KVH] when the caches hold int8 / fp8 levels."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    quantized = k_scales is not None
    ks = k_scales if quantized else q
    vs = v_scales if quantized else q
    scale_strides = (ks.stride(0), ks.stride(1), ks.stride(2)) if quantized else (0, 0, 0)
    num_tiles = tile_map.shape[1]
    _attention_kernel[(num_tiles, n_kv)](
        out, q, k_cache, v_cache, ks, vs,
        block_tables, seq_lens, query_start, tile_map,
        scale, num_tiles,
        q.stride(0), q.stride(1), out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scale_strides,
        block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1], GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim, DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        QUANTIZED=quantized, IEEE=q.dtype == torch.float32,
    )
