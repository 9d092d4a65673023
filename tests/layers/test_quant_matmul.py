"""The GGUF-block matmul (csrc/quant_matmul.cpp, layers/quant_blocks.py) against its references.

Packing is lossless (the packed blocks dequantize to exactly what the file's bytes do); the
kernel's vector path gives the same bits as its plain C++ path and stays within float rounding
of the float64 reference of the same arithmetic; a row's result does not depend on the rows
beside it. The AVX2 build runs this file too (test_kernel_variants.py), and
test_kernel_variants checks that build's bits equal this machine's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferd.layers import quant_blocks
from inferd.models import gguf_quants

KINDS = ("Q4_0", "Q4_1", "Q8_0")
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Raw GGUF bytes of a [rows, cols] tensor: random levels, f16 scales of a trained model's size."""
    g = np.random.default_rng(seed)
    nb = cols // 32
    out = np.zeros((rows, nb, _BYTES[kind]), dtype=np.uint8)
    out[..., 0:2] = g.uniform(0.001, 0.05, (rows, nb)).astype(np.float16)[..., None].view(np.uint8)
    if kind == "Q4_1":
        out[..., 2:4] = g.uniform(-0.4, 0.0, (rows, nb)).astype(np.float16)[..., None].view(np.uint8)
    body = 2 if kind != "Q4_1" else 4
    if kind == "Q8_0":
        out[..., body:] = g.integers(-128, 128, (rows, nb, 32)).astype(np.int8).view(np.uint8)
    else:
        out[..., body:] = g.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    return torch.from_numpy(out.reshape(rows, -1))


@pytest.mark.parametrize("kind", KINDS)
def test_packing_is_lossless(kind):
    raw = random_blocks(kind, 40, 96)  # 40 rows: not a whole number of 16-column groups
    packed = quant_blocks.pack(raw, kind, (40, 96))
    assert torch.equal(packed.dequantize(), gguf_quants.dequantize(raw, kind, (40, 96)))
    assert packed.packed.shape == (3, 3, 512 if kind == "Q8_0" else 256)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 40])
@pytest.mark.parametrize("terms", [1, 2])
def test_kernel_matches_its_references(kernels, kind, rows, terms):
    raw = random_blocks(kind, 72, 160, seed=rows)
    w = quant_blocks.pack(raw, kind, (72, 160), terms)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # an all-zero activation block (scale 0)
    y = quant_blocks.matmul(kernels, x, w)
    assert y.shape == (rows, 72) and y.dtype == torch.float32
    # the vector path and the plain C++ path: the same operations, the same bits
    assert torch.equal(y, quant_blocks.matmul(kernels, x, w, reference=True))
    # the float64 reference of the same arithmetic: fp32 accumulation error only
    exact = quant_blocks.reference_matmul(x, w)
    scale = exact.abs().max()
    assert ((y.double() - exact).abs().max() / scale) < 1e-5
    # and against the float weights: the cost of quantized activations (one int8 term: llama.cpp's)
    dense = x.double() @ w.dequantize().double().T
    assert ((y.double() - dense).abs().max() / dense.abs().max()) < (0.02 if terms == 1 else 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_a_rows_result_does_not_depend_on_its_batch(kernels, kind):
    w = quant_blocks.pack(random_blocks(kind, 48, 128), kind, (48, 128))
    x = torch.randn(21, 128, generator=torch.Generator().manual_seed(1))
    batch = quant_blocks.matmul(kernels, x, w)
    alone = torch.cat([quant_blocks.matmul(kernels, x[i:i + 1], w) for i in range(len(x))])
    assert torch.equal(batch, alone)
    shuffled = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
    assert torch.equal(quant_blocks.matmul(kernels, x[shuffled], w), batch[shuffled])


def test_bfloat16_activations_and_fused_parts(kernels):
    parts = [quant_blocks.pack(random_blocks("Q4_1", n, 64, seed=n), "Q4_1", (n, 64)) for n in (32, 16, 24)]
    fused = quant_blocks.concat(parts)
    assert fused.out_features == 72
    x = torch.randn(5, 64)
    assert torch.equal(quant_blocks.matmul(kernels, x, fused),
                       torch.cat([quant_blocks.matmul(kernels, x, p) for p in parts], dim=1))
    xb = x.to(torch.bfloat16)
    yb = quant_blocks.matmul(kernels, xb, fused)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, quant_blocks.matmul(kernels, xb.float(), fused).to(torch.bfloat16))
    # parts of another kind, or a part that leaves a group half full, keep the layer in floats
    other = quant_blocks.pack(random_blocks("Q8_0", 16, 64), "Q8_0", (16, 64))
    assert quant_blocks.concat([parts[0], other]) is None
    assert quant_blocks.concat([parts[2], parts[0]]) is None


def test_shapes_are_checked(kernels):
    w = quant_blocks.pack(random_blocks("Q4_0", 16, 64), "Q4_0", (16, 64))
    with pytest.raises(RuntimeError, match="inputs"):
        quant_blocks.matmul(kernels, torch.randn(2, 96), w)
    with pytest.raises(ValueError, match="cannot pack"):
        quant_blocks.pack(torch.zeros(10, dtype=torch.uint8), "Q6_K", (1, 256))
