"""Turning GGUF tensor bytes into float32 torch tensors.

GGUF stores each tensor either as plain floats (F32, F16, BF16) or in one of
ggml's block formats. We support the simple 32-element block formats:

    Q8_0: f16 scale d, 32 x int8 q            x = q * d
    Q4_0: f16 scale d, 16 bytes of nibbles    x = (q - 8) * d
    Q4_1: f16 scale d, f16 min m, 16 bytes    x = q * d + m

In a Q4 block byte j holds element j in its low nibble and element j + 16 in
its high nibble. Everything here is vectorised torch on the raw uint8 bytes,
so the same code serves the GGUF file and the conversion cache.
"""

from __future__ import annotations

import torch

BLOCK = 32

# ggml type id -> (name, bytes per 32-element block); the ids are ggml's own.
_QUANT_TYPES = {
    2: ("Q4_0", 18),
    3: ("Q4_1", 20),
    8: ("Q8_0", 34),
}
# ggml type id -> (name, torch dtype) for the types stored as plain numbers.
_FLOAT_TYPES = {
    0: ("F32", torch.float32),
    1: ("F16", torch.float16),
    30: ("BF16", torch.bfloat16),
}

SUPPORTED_TYPES = {name for name, _ in _QUANT_TYPES.values()} | {
    name for name, _ in _FLOAT_TYPES.values()
}
_BY_NAME = {name: type_id for type_id, (name, _) in {**_QUANT_TYPES, **_FLOAT_TYPES}.items()}


def type_name(type_id: int) -> str:
    """ggml's name for a type id, e.g. 3 -> "Q4_1" (falls back to the number)."""
    for table in (_QUANT_TYPES, _FLOAT_TYPES):
        if type_id in table:
            return table[type_id][0]
    try:
        import gguf

        return gguf.GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return str(type_id)


def float_dtype(name: str) -> torch.dtype:
    """The torch dtype a float GGUF type is stored as."""
    return _FLOAT_TYPES[_BY_NAME[name]][1]


def check_supported(name: str, tensor_name: str) -> None:
    if name not in SUPPORTED_TYPES:
        raise ValueError(
            f"GGUF tensor {tensor_name!r} has type {name}, which inferd cannot read; "
            f"supported types are {', '.join(sorted(SUPPORTED_TYPES))}"
        )


def dequantize(data: torch.Tensor, name: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Decode one tensor to float32 with torch `shape` (row-major, HF order).

    `data` is the raw uint8 bytes for a block type, or the stored float tensor
    for F32/F16/BF16.
    """
    shape = tuple(int(s) for s in shape)
    if name in ("F32", "F16", "BF16"):
        if data.dtype == torch.uint8:
            data = data.reshape(-1).view(float_dtype(name))
        return data.reshape(shape).to(torch.float32)
    if name not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ValueError(f"cannot dequantize GGUF type {name}")
    block_bytes = _QUANT_TYPES[_BY_NAME[name]][1]
    blocks = data.reshape(-1, block_bytes)
    # The scales sit at byte offsets that are not 2-aligned in the whole
    # buffer, so copy them out before reinterpreting them as f16.
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)
    # Convert to float once into a fresh buffer and scale it in place:
    # torch's out-of-place broadcast multiply is several times slower here.
    if name == "Q8_0":
        out = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        out.mul_(d)
    else:
        packed = blocks[:, block_bytes - 16 :]
        q = torch.empty((blocks.shape[0], BLOCK), dtype=torch.uint8)
        torch.bitwise_and(packed, 0x0F, out=q[:, :16])
        torch.bitwise_right_shift(packed, 4, out=q[:, 16:])
        out = q.to(torch.float32)
        if name == "Q4_0":
            # (q - 8) is exact in float, so this matches ggml's int subtract.
            out.sub_(8.0).mul_(d)
        else:
            m = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
            # Multiply then add as two roundings (not a fused multiply-add),
            # which is what ggml's reference and gguf-py compute.
            out.mul_(d).add_(m)
    n = 1
    for s in shape:
        n *= s
    if out.numel() != n:
        raise ValueError(f"{name} data holds {out.numel()} values, shape {shape} needs {n}")
    return out.reshape(shape)

