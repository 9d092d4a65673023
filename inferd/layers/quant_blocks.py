"""A GGUF file's quantized weights kept as they are, and the matmul that reads them.

A Q4_1 file dequantized to bf16 makes every decode step read 4x the bytes the
file holds; these weights stay in the file's own blocks instead: the exact 4-bit
(or 8-bit) levels and the file's f16 scales, repacked once at load time into the
layout the integer-dot-product kernel reads (csrc/quant_matmul.cpp, where the
layout is described). Nothing is rounded on the way: `dequantize()` of a packed
weight gives back exactly what models/gguf_quants.dequantize gives for the file's bytes.

The kernel quantizes each row's activations to int8 per block of 32, as
llama.cpp's Q4 x Q8 kernels do, plus (ACTIVATION_TERMS = 2) a second int8 term for
what the first left over, which takes the accuracy cost from 0.56% of perplexity
to a few hundredths on the default model for ~1.5x the arithmetic; it accumulates every output block by block in
fp32 with the same operations on every path, so a row's result does not depend
on the other rows of the batch or on the CPU's instruction set.
`reference_matmul` is the same arithmetic in float64 torch, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COLUMNS = 16          # output columns per packed group (one AVX-512 vector of fp32)
BLOCK = 32            # inputs per GGUF block
PACKABLE = ("Q4_0", "Q4_1", "Q8_0")
# int8 terms an activation is split into: 1 is llama.cpp's Q8 activations, 2 adds the remainder
ACTIVATION_TERMS = 2
_RAW_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# the offset each kind's levels are stored with: q - offset is the signed level
_OFFSET = {"Q4_0": 8, "Q4_1": 0, "Q8_0": 128}


@dataclass
class PackedWeight:
    """One weight matrix [out_features, in_features] in packed blocks."""

    kind: str                 # Q4_0 | Q4_1 | Q8_0
    packed: torch.Tensor      # uint8 [groups, blocks, 256 or 512]
    d: torch.Tensor           # f16 [groups, blocks, 16]
    m: torch.Tensor           # f16 [groups, blocks, 16] (Q4_1), else empty
    out_features: int
    in_features: int
    terms: int = 2            # int8 activation terms the matmul uses (ACTIVATION_TERMS)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.d.nbytes + self.m.nbytes

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these blocks encode [out_features, in_features]."""
        levels, d, m = _unpack(self)
        w = (levels.float() - _OFFSET[self.kind]) * d.float()[..., None]
        if self.kind == "Q4_1":
            w = w + m.float()[..., None]
        return w.reshape(-1, self.in_features)[: self.out_features]


def pack(raw: torch.Tensor, kind: str, shape: tuple[int, int] | list[int],
         terms: int = ACTIVATION_TERMS) -> PackedWeight:
    """Repack a tensor's raw GGUF bytes (rows of whole blocks, HF row order) for the kernel, which
    will split activations into `terms` int8 terms."""
    if kind not in PACKABLE:
        raise ValueError(f"cannot pack GGUF type {kind} (packable: {', '.join(PACKABLE)})")
    n, k = (int(s) for s in shape)
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
    nb = k // BLOCK
    blocks = raw.reshape(-1).view(torch.uint8).reshape(n, nb, _RAW_BYTES[kind])
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)
    m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, nb) if kind == "Q4_1" else None
    if kind == "Q8_0":
        levels = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    else:
        qs = blocks[..., -16:]
        # byte j of a GGUF Q4 block: element j in the low nibble, element j + 16 in the high
        levels = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    groups = -(-n // COLUMNS)
    pad = groups * COLUMNS - n
    if pad:
        levels = torch.cat([levels, levels.new_zeros(pad, nb, BLOCK)])
        d = torch.cat([d, d.new_zeros(pad, nb)])
        m = None if m is None else torch.cat([m, m.new_zeros(pad, nb)])
    # [groups, 16 columns, blocks, 32] -> [groups, blocks, 16 columns, 32]
    levels = levels.reshape(groups, COLUMNS, nb, BLOCK).transpose(1, 2)
    if kind == "Q8_0":
        # chunk ch of 4 elements, every column: [groups, blocks, 8, 16, 4]
        packed = levels.reshape(groups, nb, COLUMNS, 8, 4).transpose(2, 3)
    else:
        # element 8p + 4h + j: nibble h of byte [p][column][j]
        parts = levels.reshape(groups, nb, COLUMNS, 4, 2, 4)
        packed = (parts[..., 0, :] | (parts[..., 1, :] << 4)).transpose(2, 3)
    return PackedWeight(
        kind=kind,
        packed=packed.reshape(groups, nb, -1).contiguous(),
        d=_by_group(d, groups, nb),
        m=_by_group(m, groups, nb) if m is not None else torch.empty(0, dtype=torch.float16),
        out_features=n, in_features=k, terms=terms)


def concat(parts: list[PackedWeight]) -> PackedWeight | None:
    """One weight whose rows are the parts' rows in order (fused q/k/v, gate/up), or None
    when they differ in kind or a part's rows do not fill whole groups (then the layer
    stays in floats)."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1 or len({p.in_features for p in parts}) != 1:
        return None
    if any(p.out_features % COLUMNS for p in parts[:-1]):
        return None
    return PackedWeight(
        kind=parts[0].kind,
        packed=torch.cat([p.packed for p in parts]), d=torch.cat([p.d for p in parts]),
        m=torch.cat([p.m for p in parts]) if parts[0].kind == "Q4_1" else parts[0].m,
        out_features=sum(p.out_features for p in parts), in_features=parts[0].in_features, terms=parts[0].terms)


def matmul(ops, x: torch.Tensor, w: PackedWeight, reference: bool = False) -> torch.Tensor:
    """x [rows, in_features] @ w.T in the kernel (`reference`: its plain C++ path)."""
    return ops.quant_matmul(x, w.packed, w.d, w.m, w.out_features, reference, w.terms)


def quantize_activations(x: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation levels and scale per row and block (fp32 torch, the kernel's own
    operations): q [rows, blocks, 32], d [rows, blocks] with x ~ d * q. With two terms the
    second int8 term quantizes what the first left over at 1/256 of its scale, and
    q = 256 * q1 + q2 (see QuantRows in csrc/quant_matmul.cpp)."""
    rows, k = x.shape
    rest = x.float().reshape(rows, k // BLOCK, BLOCK)
    d = rest.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = 0
    for term in range(terms):
        if term:
            d, inv, q = d / 256, inv * 256, q * 256
        level = torch.round(rest * inv[..., None]).clamp(-127, 127)
        rest = rest - d[..., None] * level
        q = q + level
    return q, d


def reference_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The kernel's arithmetic in float64: quantized activations, exact block sums."""
    levels, d, m = _unpack(w)                                # [N, nb, 32], [N, nb]
    levels = levels.double() - _OFFSET[w.kind]
    q, da = quantize_activations(x, w.terms)
    sums = torch.einsum("rbe,nbe->rnb", q.double(), levels)
    out = (sums * d.double()[None] * da.double()[:, None]).sum(-1)
    if w.kind == "Q4_1":
        out = out + (m.double()[None] * (da.double() * q.double().sum(-1))[:, None]).sum(-1)
    return out[:, : w.out_features]


def _by_group(scales: torch.Tensor, groups: int, nb: int) -> torch.Tensor:
    return scales.reshape(groups, COLUMNS, nb).transpose(1, 2).contiguous()


def _unpack(w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Levels [rows, blocks, 32] and scales [rows, blocks] (padding rows included)."""
    groups, nb = w.packed.shape[:2]
    if w.kind == "Q8_0":
        levels = w.packed.reshape(groups, nb, 8, COLUMNS, 4).transpose(2, 3)
    else:
        nibbles = w.packed.reshape(groups, nb, 4, COLUMNS, 4).transpose(2, 3)
        levels = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-2)   # [g, nb, 16, 4, 2, 4]
    levels = levels.reshape(groups, nb, COLUMNS, BLOCK).transpose(1, 2).reshape(-1, nb, BLOCK)
    d = w.d.transpose(1, 2).reshape(-1, nb)
    m = w.m.transpose(1, 2).reshape(-1, nb) if w.kind == "Q4_1" else None
    return levels, d, m
