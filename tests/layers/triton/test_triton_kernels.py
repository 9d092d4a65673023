"""The Triton kernels (layers/triton_ops) against float64 math and the torch code they replace.

Caches hold each request's context in shuffled blocks; steps mix decodes, prompt chunks
over a cached prefix and whole prompts, with uneven lengths; outputs are poisoned with
NaN first, so a row the kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from inferd.layers import kv_storage
from inferd.layers.activation import silu_and_mul
from inferd.layers.cpu_kernels import disabled
from inferd.layers.norm import RMSNorm
from inferd.layers.rope import RotaryEmbedding, _rotate
from inferd.layers.triton_ops import paged_attention as pa

# Triton's interpreter stores bfloat16 as raw 16-bit integers (its matrix products and casts of them are
# not bfloat16 arithmetic), so without a GPU the half-precision paths are checked in float16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


def _step(device, dtype, query_lens, seq_lens, n_heads, n_kv, head_dim, block_size=16, seed=0):
    """Caches with random contents in shuffled blocks, this step's q/k/v, and its layout."""
    g = torch.Generator().manual_seed(seed)
    per_req = [(n + block_size - 1) // block_size for n in seq_lens]
    n_blocks = sum(per_req) + 2
    cache = torch.randn(2, n_blocks, block_size, n_kv, head_dim, generator=g).to(dtype)
    order = torch.randperm(n_blocks, generator=g).tolist()
    tables, used = [], 0
    for k in per_req:
        tables.append(order[used:used + k])
        used += k
    width = max(map(len, tables))
    t = sum(query_lens)
    q = torch.randn(t, n_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, n_kv, head_dim, generator=g).to(dtype)
    v = torch.randn(t, n_kv, head_dim, generator=g).to(dtype)
    slots = [tab[p // block_size] * block_size + p % block_size
             for tab, ql, sl in zip(tables, query_lens, seq_lens) for p in range(sl - ql, sl)]
    layout = dict(
        block_tables=torch.tensor([tab + [0] * (width - len(tab)) for tab in tables], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start=torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32),
        slots=torch.tensor(slots, dtype=torch.int64))
    move = {name: x.to(device) for name, x in layout.items()}
    return cache.to(device), q.to(device), k.to(device), v.to(device), tables, move


def _exact(cache_k, cache_v, q, tables, query_lens, seq_lens):
    """float64 causal attention of each new token over its request's blocks."""
    n_heads, n_kv, dim = q.shape[1], cache_k.shape[2], q.shape[2]
    rows, start = [], 0
    for tab, ql, sl in zip(tables, query_lens, seq_lens):
        keys = cache_k[tab].reshape(-1, n_kv, dim)[:sl].double().repeat_interleave(n_heads // n_kv, 1)
        values = cache_v[tab].reshape(-1, n_kv, dim)[:sl].double().repeat_interleave(n_heads // n_kv, 1)
        for i in range(ql):
            pos = sl - ql + i
            scores = torch.einsum("hd,thd->ht", q[start + i].double(), keys[:pos + 1]) * dim ** -0.5
            rows.append(torch.einsum("ht,thd->hd", scores.softmax(-1), values[:pos + 1]).reshape(-1))
        start += ql
    return torch.stack(rows)


def _run_attention(kernels, cache, q, layout, quantized=None, block_q=None):
    n_heads, n_kv = q.shape[1], (cache if quantized is None else quantized.data).shape[-2]
    query_lens = (layout["query_start"][1:] - layout["query_start"][:-1]).tolist()
    prompt = max(query_lens) > 1
    block_q = block_q or pa.block_q_for(n_heads // n_kv, prompt)
    tile_map = torch.tensor(pa.tiles(query_lens, block_q), dtype=torch.int32, device=q.device)
    out = torch.full((q.shape[0], n_heads * q.shape[2]), float("nan"), dtype=q.dtype, device=q.device)
    data, scales = (quantized.data, quantized.scales) if quantized is not None else (cache, (None, None))
    kernels.paged_attention(out, q, data[0], data[1], scales[0], scales[1], layout["block_tables"],
                            layout["seq_lens"], layout["query_start"], tile_map, block_q, q.shape[2] ** -0.5)
    return out


# (query lens, seq lens): decodes over long and short contexts; chunks over a cached prefix; a whole
# prompt; a mixed step of all three
STEPS = [
    ([1, 1, 1, 1], [1, 17, 40, 100]),
    ([5, 23], [30, 23]),
    ([1, 7, 1, 33, 2], [9, 7, 64, 50, 3]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (8, 1)])   # GQA padded to a power of two, MHA, MQA
@pytest.mark.parametrize("step", STEPS)
def test_paged_attention_matches_float64(kernels, device, dtype, heads, step):
    query_lens, seq_lens = step
    cache, q, _, _, tables, layout = _step(device, dtype, query_lens, seq_lens, *heads, head_dim=32)
    out = _run_attention(kernels, cache, q, layout)
    assert not out.isnan().any()
    exact = _exact(cache[0].cpu(), cache[1].cpu(), q.cpu(), tables, query_lens, seq_lens)
    tol = 1e-4 if dtype == torch.float32 else 1e-2 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.cpu().double(), exact, atol=tol, rtol=tol)


@pytest.mark.parametrize("block_q", [1, 4, 16])
def test_attention_does_not_depend_on_the_tiling(kernels, device, block_q):
    """Each query is its own row of the online softmax: the tile size changes nothing."""
    query_lens, seq_lens = [1, 19, 6], [40, 19, 30]
    cache, q, _, _, _, layout = _step(device, torch.float32, query_lens, seq_lens, 6, 2, 64, block_size=8)
    ref = _run_attention(kernels, cache, q, layout, block_q=2)
    out = _run_attention(kernels, cache, q, layout, block_q=block_q)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_fills_the_slots_and_skips_padding(kernels, device, dtype):
    query_lens, seq_lens = [3, 1, 4], [10, 20, 4]
    cache, _, k, v, _, layout = _step(device, dtype, query_lens, seq_lens, 6, 2, 32)
    slots = layout["slots"].clone()
    slots[1] = -1                                      # a padding row: nothing written
    ref = cache.clone()
    live = slots >= 0
    n_kv, dim = cache.shape[-2], cache.shape[-1]
    ref[0].view(-1, n_kv, dim)[slots[live]] = k[live]
    ref[1].view(-1, n_kv, dim)[slots[live]] = v[live]
    kernels.write_kv(cache[0], cache[1], k, v, slots)
    torch.testing.assert_close(cache, ref, atol=0, rtol=0)


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_write_and_attention(kernels, device, storage):
    """The kernel's levels and scales are kv_storage.quantize's; attention over the levels matches
    float64 math on the dequantized cache."""
    query_lens, seq_lens = [1, 9, 1], [33, 9, 70]
    _, q, k, v, tables, layout = _step(device, HALF, query_lens, seq_lens, 6, 2, 64)
    n_blocks = int(layout["block_tables"].max()) + 1
    g = torch.Generator().manual_seed(1)
    # every slot written through the kernel: the context's older tokens first, then this step's
    cache = kv_storage.QuantizedKV.zeros(n_blocks, 16, 2, 64, device, storage)
    ctx_slots = torch.tensor([tab[p // 16] * 16 + p % 16 for tab, sl in zip(tables, seq_lens) for p in range(sl)],
                             device=device)
    old = ~torch.isin(ctx_slots, layout["slots"])
    ck = torch.randn(int(old.sum()), 2, 64, generator=g).to(HALF).to(device)
    cv = torch.randn(int(old.sum()), 2, 64, generator=g).to(HALF).to(device)
    kernels.write_kv(cache.data[0], cache.data[1], ck, cv, ctx_slots[old], cache.scales[0], cache.scales[1])
    kernels.write_kv(cache.data[0], cache.data[1], k, v, layout["slots"], cache.scales[0], cache.scales[1])

    levels, scales = kv_storage.quantize(k, storage)
    n_kv, dim = 2, 64
    got = cache.data[0].view(-1, n_kv, dim)[layout["slots"]]
    if storage == torch.int8:
        torch.testing.assert_close(got.int(), levels.int(), atol=0, rtol=0)
    else:
        torch.testing.assert_close(got.float(), levels.float(), atol=0, rtol=0)
    torch.testing.assert_close(cache.scales[0].view(-1, n_kv)[layout["slots"]], scales, atol=0, rtol=0)

    out = _run_attention(kernels, None, q, layout, quantized=cache)
    assert not out.isnan().any()
    deq = cache.data.cpu().float().double() * cache.scales.cpu().double()[..., None]
    exact = _exact(deq[0], deq[1], q.cpu(), tables, query_lens, seq_lens)
    torch.testing.assert_close(out.cpu().double(), exact, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_torch_path(kernels, device, dtype, with_residual):
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(96, 1e-5, dtype)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(7, 96, generator=g).to(dtype)
    residual = torch.randn(7, 96, generator=g).to(dtype) if with_residual else None
    with disabled():
        ref = norm.forward(x.clone(), residual.clone() if with_residual else None)
    out = torch.full_like(x, float("nan")).to(device)
    res = residual.clone().to(device) if with_residual else None
    kernels.rms_norm(out, x.to(device), res, norm.weight.to(device), 1e-5)
    ref_out, ref_res = ref if with_residual else (ref, None)
    if with_residual:
        torch.testing.assert_close(res.cpu(), ref_res, atol=0, rtol=0)   # the sum rounded as torch rounds it
    tol = 1e-5 if dtype == torch.float32 else 1e-2   # fp32 reduction order; one half-precision step
    torch.testing.assert_close(out.cpu(), ref_out, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_the_torch_path(kernels, device, dtype):
    g = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(64, 512, 10000.0)
    positions = torch.tensor([0, 5, 17, 300, 511])
    cos, sin = rope.tables(positions, dtype)
    qkv = torch.randn(5, (6 + 2 * 2) * 64, generator=g).to(dtype)
    q, k, _ = qkv.view(5, 10, 64).split([6, 2, 2], dim=1)        # strided views, as the model's are
    ref_q, ref_k = _rotate(q, (cos, sin)), _rotate(k, (cos, sin))
    qkv_dev = qkv.to(device)
    q_dev, k_dev, v_dev = qkv_dev.view(5, 10, 64).split([6, 2, 2], dim=1)
    kernels.rope(q_dev, k_dev, cos.to(device), sin.to(device))
    torch.testing.assert_close(q_dev.cpu(), ref_q, atol=0, rtol=0)
    torch.testing.assert_close(k_dev.cpu(), ref_k, atol=0, rtol=0)
    torch.testing.assert_close(v_dev.cpu(), qkv.view(5, 10, 64)[:, 8:], atol=0, rtol=0)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_torch_path(kernels, device, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 2 * 1500, generator=g) * 3).to(dtype)   # two column blocks, the second partial
    with disabled():
        ref = silu_and_mul(x)
    out = torch.full((5, 1500), float("nan"), dtype=dtype, device=device)
    kernels.silu_and_mul(out, x.to(device))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
