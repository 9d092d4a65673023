"""The int8 and fp8 KV caches (layers/kv_storage.py): quantized writes, paged decode attention over int8
blocks against float64 math, and the engine with `kv_cache_dtype="int8"`.

The kernel tests are skipped only where the CPU kernels cannot be built; CI sets
INFERD_REQUIRE_CPU_KERNELS=1, which turns that skip into a failure.
"""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.layers import cpu_kernels, kv_storage
from inferd.layers.attention import TorchAttentionBackend
from inferd.layers.kv_storage import QuantizedKV
from tests.layers.test_cpu_kernels import DTYPES, _exact_attention, _paged_setup


def _quantized(cache: torch.Tensor) -> QuantizedKV:
    q, s = kv_storage.quantize(cache)
    return QuantizedKV(q, s)


def _dequantized(cache: QuantizedKV) -> torch.Tensor:
    return cache.data.double() * cache.scales.double()[..., None]


def test_quantize_levels_and_scales():
    x = torch.tensor([[[0.5, -1.27, 0.0, 0.01]], [[0.0, 0.0, 0.0, 0.0]]])
    q, s = kv_storage.quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (2, 1)
    assert q[0, 0].tolist() == [50, -127, 0, 1] and s[0, 0].item() == pytest.approx(0.01)
    assert q[1].abs().sum() == 0 and s[1].item() == 0       # an all-zero row: scale 0, no division by it
    y = torch.randn(50, 3, 64) * 4
    q, s = kv_storage.quantize(y)
    err = (q.float() * s[..., None] - y).abs()
    assert (err <= s[..., None] / 2 + 1e-6).all()           # within half a level of every value


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_writes_the_same_levels_and_scales_as_torch(kernels, dtype):
    cache, q, k, v, meta, _ = _paged_setup(dtype, 64, [3, 9, 17])
    a, b = _quantized(cache.float()), _quantized(cache.float())
    kernels.write_kv(a.data[0], a.data[1], k, v, meta.slot_mapping, a.scales[0], a.scales[1])
    kv_storage.write(b, k, v, meta.slot_mapping)
    assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 24])   # 24: the path without 16-wide vectors
def test_paged_int8_decode_attention_matches_exact_math(kernels, dtype, head_dim):
    """Shuffled blocks, uneven lengths: the kernel reading int8 in place and the gathered
    torch path both equal float64 attention over the dequantized cache."""
    seq_lens = [1, 4, 5, 37, 130]
    dense, q, k, v, meta, tables = _paged_setup(dtype, head_dim, seq_lens)
    scale = head_dim ** -0.5
    backend = TorchAttentionBackend()
    cache, ref_cache = _quantized(dense), _quantized(dense)
    with cpu_kernels.disabled():
        backend.prepare(meta, torch.device("cpu"))
        ref = backend.forward(q, k, v, ref_cache, meta, scale)
    backend.prepare(meta, torch.device("cpu"))
    got = backend.forward(q, k, v, cache, meta, scale)
    assert torch.equal(cache.data, ref_cache.data) and torch.equal(cache.scales, ref_cache.scales)
    exact = _exact_attention(_dequantized(cache), q, tables, seq_lens, scale)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=tol)
    torch.testing.assert_close(ref.double(), exact, atol=5 * tol, rtol=5 * tol)
    # and close to attention over the unquantized cache: the cost of int8 levels
    written = dense.double()
    for i, x in enumerate((k, v)):  # the new tokens, unquantized
        written[i].view(-1, *x.shape[1:])[meta.slot_mapping] = x.double()
    dense_exact = _exact_attention(written, q, tables, seq_lens, scale)
    assert (got.double() - dense_exact).abs().max() < 0.05


def test_kernels_refuse_int8_caches_without_scales(kernels):
    dense, q, k, v, meta, _ = _paged_setup(torch.float32, 64, [5, 9])
    cache = _quantized(dense)
    out = torch.empty(2, 6 * 64)
    with pytest.raises(RuntimeError, match="needs its scales"):
        kernels.write_kv(cache.data[0], cache.data[1], k, v, meta.slot_mapping)
    with pytest.raises(RuntimeError, match="needs its scales"):
        kernels.decode_attention(out, q, cache.data[0], cache.data[1], meta.block_tables,
                                 torch.tensor(meta.seq_lens), torch.arange(2), 0.125)
    with pytest.raises(RuntimeError, match="scales must be fp32"):
        kernels.write_kv(cache.data[0], cache.data[1], k, v, meta.slot_mapping, cache.scales[0][:1],
                         cache.scales[1])


def test_engine_with_an_int8_kv_cache_holds_more_and_answers_alike():
    """The same budget holds 128 / 68 more blocks in bf16 (fp32: 256 / 68); greedy answers on the
    embedded model in bf16 start as the bf16 cache's do, and the fused decode path and the Python
    layer loop agree over int8 blocks."""
    budget = "64MiB"
    dense = LLM(dtype="float32", kv_cache_bytes=budget, progress=False)
    quant = LLM(dtype="float32", kv_cache_bytes=budget, kv_cache_dtype="int8", progress=False)
    ratio = quant.engine.core.kv.num_blocks / dense.engine.core.kv.num_blocks
    assert ratio == pytest.approx(256 / 68, rel=0.01)
    prompts = ["The capital of France is", "List three colors:", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in dense.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in quant.generate(prompts, params)]
    assert all(x[:4] == y[:4] for x, y in zip(a, b))          # int8 levels may part at a near tie later
    with cpu_kernels.disabled():
        c = [o.outputs[0].token_ids for o in quant.generate(prompts, params)]
    assert sum(x == y for x, y in zip(b, c)) >= 2             # kernel vs torch: different fp32 sum order


def test_an_fp8_cache_runs_on_the_torch_path_close_to_float():
    """fp8 (e4m3 values, per-row scales) on the gathered path: attention within fp8's precision of the
    float cache's, and the engine answers with it (the kernels, built or not, are not used for it)."""
    dense, q, k, v, meta, tables = _paged_setup(torch.float32, 64, [3, 17, 40])
    fp8 = QuantizedKV(*kv_storage.quantize(dense, torch.float8_e4m3fn))
    assert fp8.data.dtype == torch.float8_e4m3fn and not fp8.in_kernel_form
    backend = TorchAttentionBackend()
    backend.prepare(meta, torch.device("cpu"))
    got = backend.forward(q, k, v, fp8, meta, 0.125)
    written = dense.double()
    for i, x in enumerate((k, v)):
        written[i].view(-1, *x.shape[1:])[meta.slot_mapping] = x.double()
    exact = _exact_attention(written, q, tables, [3, 17, 40], 0.125)
    assert (got.double() - exact).abs().max() < 0.1
    llm = LLM(dtype="float32", kv_cache_dtype="fp8", kv_cache_bytes="32MiB", progress=False)
    [out] = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    assert len(out.outputs[0].token_ids) > 0


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(dtype="float32", kv_cache_dtype="int4", progress=False)
