"""Tensor datatypes of the Open Inference Protocol (KServe v2), with their numpy and ONNX names.

The protocol names a datatype `FP32`, `INT64`, `BOOL`...; ONNX Runtime reports an input's type
as `tensor(float)`, `tensor(int64)`...; numpy needs a dtype. BYTES (strings) is left out: the
models served here take numbers.
"""

from __future__ import annotations

import numpy as np

# protocol name -> (numpy dtype, ONNX Runtime type string)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "tensor(bool)"),
    "UINT8": (np.dtype(np.uint8), "tensor(uint8)"),
    "UINT16": (np.dtype(np.uint16), "tensor(uint16)"),
    "UINT32": (np.dtype(np.uint32), "tensor(uint32)"),
    "UINT64": (np.dtype(np.uint64), "tensor(uint64)"),
    "INT8": (np.dtype(np.int8), "tensor(int8)"),
    "INT16": (np.dtype(np.int16), "tensor(int16)"),
    "INT32": (np.dtype(np.int32), "tensor(int32)"),
    "INT64": (np.dtype(np.int64), "tensor(int64)"),
    "FP16": (np.dtype(np.float16), "tensor(float16)"),
    "FP32": (np.dtype(np.float32), "tensor(float)"),
    "FP64": (np.dtype(np.float64), "tensor(double)"),
}
_BY_ONNX = {onnx: name for name, (_, onnx) in DATATYPES.items()}
_BY_NUMPY = {dtype: name for name, (dtype, _) in DATATYPES.items()}


def from_onnx(onnx_type: str) -> str:
    """The protocol datatype of an ONNX Runtime type string; ValueError for types not served."""
    try:
        return _BY_ONNX[onnx_type]
    except KeyError:
        raise ValueError(f"the tensor type {onnx_type} is not supported (numeric tensors only)") from None


def from_numpy(dtype: np.dtype) -> str:
    return _BY_NUMPY[np.dtype(dtype)]


def numpy_dtype(datatype: str) -> np.dtype:
    return DATATYPES[datatype][0]
