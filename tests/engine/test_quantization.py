"""int8 and int4 weight-only matmuls for small batches: dispatch, error bound, and the model still answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inferd import LLM, SamplingParams
from inferd.layers.linear import INT4_GROUP, INT4_MAX_ROWS, INT8_MAX_ROWS, Linear


def _linear(n_in=256, n_out=512, bias=True):
    torch.manual_seed(0)
    lin = Linear(n_in, n_out, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.bias.normal_(0, 0.1)
    return lin


def test_small_batches_use_int8_large_ones_stay_exact():
    lin = _linear()
    x_small = torch.randn(INT8_MAX_ROWS, 256, dtype=torch.bfloat16)
    x_large = torch.randn(INT8_MAX_ROWS + 5, 256, dtype=torch.bfloat16)
    exact_small = F.linear(x_small, lin.weight, lin.bias)
    exact_large = F.linear(x_large, lin.weight, lin.bias)
    lin.quantize_int8()
    assert lin.qweight.dtype == torch.int8 and lin.qscale.shape == (512,)
    assert torch.equal(lin(x_large), exact_large)          # bf16 path, untouched
    got = lin(x_small)
    assert not torch.equal(got, exact_small)                # really the int8 kernel
    rel = (got.float() - exact_small.float()).norm() / exact_small.float().norm()
    assert rel < 0.01


def test_int8_needs_bfloat16_on_cpu(tiny_llama):
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_llama), dtype="float32", quantization="int8", progress=False)
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_llama), dtype="float32", quantization="int4", progress=False)
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_llama), quantization="int3", progress=False)


def test_default_model_with_int8_weights_still_answers():
    llm = LLM(dtype="bfloat16", quantization="int8", progress=False)
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in out.outputs[0].text


def test_small_batches_use_int4_large_ones_stay_exact():
    lin = _linear()
    x_small = torch.randn(INT4_MAX_ROWS, 256, dtype=torch.bfloat16)
    x_large = torch.randn(INT4_MAX_ROWS + 1, 256, dtype=torch.bfloat16)
    exact_small = F.linear(x_small, lin.weight, lin.bias)
    exact_large = F.linear(x_large, lin.weight, lin.bias)
    lin.quantize_int4()
    assert lin.q4weight is not None
    assert torch.equal(lin(x_large), exact_large)          # bf16 path, untouched
    got = lin(x_small)
    rel = (got.float() - exact_small.float()).norm() / exact_small.float().norm()
    assert 0.01 < rel < 0.12                                # 16 levels per group of 32


def test_int4_is_lossless_on_weights_already_on_q4_1_levels():
    """A Q4_1 GGUF's weights (d * q + m per group of 32) come back on their own levels."""
    torch.manual_seed(1)
    groups = 256 // INT4_GROUP
    d = (torch.rand(512, groups, 1) * 0.01 + 0.001).bfloat16().float()
    m = (-8 * d + torch.randn(512, groups, 1) * 1e-3).bfloat16().float()
    q = torch.randint(0, 16, (512, groups, INT4_GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15                            # Q4_1 spans each group's min..max
    lin = Linear(256, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_((d * q + m).view(512, 256))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    exact = F.linear(x.float(), lin.weight.float())
    plain = F.linear(x, lin.weight).float()
    lin.quantize_int4()
    got = lin(x).float()
    # as close to the exact product as bf16's own matmul is (both round the output to bf16)
    assert (got - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-3


def test_default_model_with_int4_weights_still_answers():
    llm = LLM(dtype="bfloat16", quantization="int4", progress=False)
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in out.outputs[0].text
