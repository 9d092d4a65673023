"""The fused CPU kernels against the torch code they replace, and against exact math.

Skipped only where the kernels cannot be built (no C++ compiler); CI sets
INFERD_REQUIRE_CPU_KERNELS=1, which turns that skip into a failure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.layers import cpu_kernels
from inferd.layers.activation import silu_and_mul
from inferd.layers.attention import AttentionMetadata, TorchAttentionBackend
from inferd.layers.norm import RMSNorm
from inferd.layers.rope import RotaryEmbedding, apply_rope


@pytest.fixture(scope="module", autouse=True)
def every_test_needs_the_kernels(kernels):
    return kernels


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_matches_torch(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6, dtype)
    norm.weight.copy_(torch.randn(96))
    x, residual = torch.randn(7, 96, dtype=dtype) * 3, torch.randn(7, 96, dtype=dtype)
    with cpu_kernels.disabled():
        ref_out, ref_res = norm(x, residual.clone())
        ref_plain = norm(x)
    out, res = norm(x, residual)             # kernel: updates residual in place
    assert res.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)   # the add rounds exactly as torch
    tol = 1e-5 if dtype == torch.float32 else 8e-3              # fp32 sums in another order
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(norm(x), ref_plain, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(5, 2 * 40, dtype=dtype) * 4     # 40: a vector part and a tail
    with cpu_kernels.disabled():
        ref = silu_and_mul(gate_up)
    got = silu_and_mul(gate_up)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    else:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_torch_bit_for_bit(dtype):
    torch.manual_seed(2)
    rope = RotaryEmbedding(64, 512, 10000.0)
    positions = torch.tensor([0, 5, 17, 300, 511])
    tables = rope.tables(positions, dtype)
    qkv = torch.randn(5, (6 + 2 * 2) * 64, dtype=dtype)
    q, k = qkv[:, :384].view(5, 6, 64), qkv[:, 384:512].view(5, 2, 64)   # strided views, as the model has
    with cpu_kernels.disabled():
        ref_q, ref_k = apply_rope(q.clone(), k.clone(), tables)
    got_q, got_k = apply_rope(q, k, tables)
    assert got_q.data_ptr() == q.data_ptr()                   # rotated in place
    torch.testing.assert_close(got_q, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(got_k, ref_k, atol=0, rtol=0)


def _paged_setup(dtype, head_dim, seq_lens, n_heads=6, n_kv=2, block_size=4, seed=3):
    """A cache with each request's context in shuffled blocks, plus one new token each."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum((n + block_size - 1) // block_size for n in seq_lens) + 3
    cache = torch.randn(2, n_blocks, block_size, n_kv, head_dim, generator=g).to(dtype)
    order = torch.randperm(n_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in seq_lens:
        k = (n + block_size - 1) // block_size
        tables.append(order[used:used + k])
        used += k
    width = max(map(len, tables))
    tables_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    t = len(seq_lens)
    q = torch.randn(t, n_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, n_kv, head_dim, generator=g).to(dtype)
    v = torch.randn(t, n_kv, head_dim, generator=g).to(dtype)
    slots = torch.tensor([tab[(n - 1) // block_size] * block_size + (n - 1) % block_size
                          for tab, n in zip(tables, seq_lens)])
    meta = AttentionMetadata(slot_mapping=slots, query_lens=[1] * t, seq_lens=list(seq_lens),
                             block_tables=tables_t)
    return cache, q, k, v, meta, tables


def _exact_attention(cache, q, tables, seq_lens, scale):
    """float64 softmax(q k^T) v per request, read straight from the blocks."""
    n_heads, n_kv = q.shape[1], cache.shape[3]
    rows = []
    for i, (tab, n) in enumerate(zip(tables, seq_lens)):
        keys = cache[0, tab].reshape(-1, n_kv, cache.shape[-1])[:n].double()
        values = cache[1, tab].reshape(-1, n_kv, cache.shape[-1])[:n].double()
        rep = n_heads // n_kv
        keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), keys) * scale
        rows.append(torch.einsum("ht,thd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 24])   # 24: the path without 16-wide vectors
def test_paged_decode_attention_matches_exact_math_and_torch(dtype, head_dim):
    seq_lens = [1, 4, 5, 37, 130]
    cache, q, k, v, meta, tables = _paged_setup(dtype, head_dim, seq_lens)
    scale = head_dim ** -0.5
    backend = TorchAttentionBackend()
    ref_cache = cache.clone()
    with cpu_kernels.disabled():
        backend.prepare(meta, torch.device("cpu"))
        ref = backend.forward(q, k, v, ref_cache, meta, scale)
    backend.prepare(meta, torch.device("cpu"))
    got = backend.forward(q, k, v, cache, meta, scale)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0)     # the same K/V written
    exact = _exact_attention(cache, q, tables, seq_lens, scale)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=tol)
    # the torch path rounds scores and probabilities to the dtype; the kernel keeps fp32
    torch.testing.assert_close(got.double(), ref.double(), atol=5 * tol, rtol=5 * tol)
    assert (got.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + 1e-6


def test_mixed_step_decodes_and_prefill_chunk():
    """Decodes by the kernel and a prefill chunk by SDPA land in the right rows."""
    dtype, head_dim = torch.float32, 32
    cache, q1, k1, v1, meta1, tables = _paged_setup(dtype, head_dim, [9, 20], block_size=4, seed=5)
    # request 3: a 6-token chunk at positions 4..9 in two fresh blocks after the others
    free = [b for b in range(cache.shape[1]) if all(b not in t for t in tables)][:3]
    g = torch.Generator().manual_seed(9)
    qc = torch.randn(6, 6, head_dim, generator=g)
    kc = torch.randn(6, 2, head_dim, generator=g)
    vc = torch.randn(6, 2, head_dim, generator=g)
    slots = [free[p // 4] * 4 + p % 4 for p in range(4, 10)]
    width = max(len(tables[0]), len(tables[1]), 3)
    meta = AttentionMetadata(
        slot_mapping=torch.cat([meta1.slot_mapping, torch.tensor(slots)]),
        query_lens=[1, 1, 6], seq_lens=[9, 20, 10],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in (tables[0], tables[1], free)]))
    q, k, v = torch.cat([q1, qc]), torch.cat([k1, kc]), torch.cat([v1, vc])
    backend = TorchAttentionBackend()
    ref_cache = cache.clone()
    with cpu_kernels.disabled():
        backend.prepare(meta, torch.device("cpu"))
        ref = backend.forward(q, k, v, ref_cache, meta, 32 ** -0.5)
    backend.prepare(meta, torch.device("cpu"))
    got = backend.forward(q, k, v, cache, meta, 32 ** -0.5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_kernels_reject_bad_indices(kernels):
    cache, q, k, v, meta, tables = _paged_setup(torch.float32, 64, [5, 9])
    out = torch.empty(2, 6 * 64)
    bad_tables = meta.block_tables.clone()
    bad_tables[1, 0] = cache.shape[1] + 7
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernels.decode_attention(out, q, cache[0], cache[1], bad_tables,
                                 torch.tensor(meta.seq_lens), torch.arange(2), 0.125)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.write_kv(cache[0], cache[1], k, v, torch.tensor([0, cache[0].numel()]))


def test_engine_greedy_tokens_same_with_and_without_kernels():
    """fp32: the whole engine (batched decode, prefill chunks) gives the same tokens."""
    prompts = [[1, 2, 3, 4, 5] * (i + 1) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(dtype="float32", progress=False, max_num_batched_tokens=16)   # forces chunked prefill
    with_kernels = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with cpu_kernels.disabled():
        without = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert with_kernels == without


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_fused_decode_layers_match_the_python_layer_loop(monkeypatch, quantization):
    """Decode-only steps run all layers in one C++ call; the per-layer Python path over
    the same kernels must give the same logprobs, bit for bit."""
    import inferd.models.llama as llama
    from inferd.models import cpu_decode

    calls = []

    def counting(*args):
        out = cpu_decode.decode_layers(*args)
        calls.append(out is not None)
        return out

    llm = LLM(dtype="bfloat16", quantization=quantization, progress=False)
    prompts = [[1, 2, 3, 4, 5] * (i + 2) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)

    def run():
        outs = llm.generate(prompts, params)
        return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in pos.items())
                                          for pos in o.outputs[0].logprobs]) for o in outs]

    monkeypatch.setattr(llama, "decode_layers", counting)
    fused = run()
    assert any(calls)                                # decode steps took the fused path
    monkeypatch.setattr(llama, "decode_layers", lambda *args: None)
    assert run() == fused


def test_two_installs_of_the_same_code_build_the_same_sources(tmp_path, monkeypatch):
    """Two checkouts (or venvs) share one kernel build: same key, and the compiler sees the same paths."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seen = []
    for checkout in ("a", "b"):
        csrc = tmp_path / checkout / "csrc"
        shutil.copytree(cpu_kernels.CSRC, csrc)
        monkeypatch.setattr(cpu_kernels, "CSRC", csrc)
        monkeypatch.setattr(cpu_kernels, "SOURCES", [csrc / p.name for p in cpu_kernels.SOURCES])
        name, directory = cpu_kernels._build_dir()
        seen.append((name, directory, cpu_kernels.build_sources(directory)))
    assert seen[0] == seen[1]
    name, directory, sources = seen[0]
    assert all(Path(s).parent == directory / "src" for s in sources)
    assert [Path(s).read_bytes() for s in sources] == [p.read_bytes() for p in cpu_kernels.SOURCES]
