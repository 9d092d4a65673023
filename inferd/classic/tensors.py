"""The Open Inference Protocol's infer request and response bodies, as typed tensors.

A request is JSON (`{"id", "parameters", "inputs": [{name, shape, datatype, data}], "outputs":
[{name, parameters}]}`), or, with Triton's binary tensor extension (what `tritonclient.http`
sends by default), a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
little-endian tensors whose sizes the inputs give as `parameters.binary_data_size`. `data` may be
flat or nested (row-major). `decode_request` turns either form into one `InferRequest`;
`encode_result` writes a result back the way each output was asked for (JSON numbers, or raw bytes
after the header when `binary_data` is set, or `binary_data_output` for all). Every mistake is a
`TensorError` that names the offending tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import numpy as np

from inferd.classic.datatypes import DATATYPES, from_numpy, numpy_dtype


class TensorError(ValueError):
    """The request's tensors are malformed or do not fit the model (a 400)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray  # shaped as the request said

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_output: bool = False                  # parameters.binary_data_output

    @property
    def predictions(self) -> int:
        """The rows it asks the model to score: the first input's batch dimension (1 without one)."""
        shape = self.inputs[0].shape
        return shape[0] if shape else 1

    @property
    def wants_binary(self) -> bool:
        """Whether any output is to be sent as binary data rather than JSON."""
        if self.outputs is None:
            return self.binary_output
        return any(o.binary for o in self.outputs)


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str | None
    outputs: tuple[tuple[str, np.ndarray, bool], ...]  # (name, array, as binary)
    rows: int  # predictions made: the batch dimension, 1 for a model without one


def _field(obj: dict, key: str, kind: type | tuple[type, ...], where: str, required: bool = True):
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TensorError(f"{where}.{key}: must be {'a ' + expected if value is not None else 'given'}")
    return value


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                                              for d in value):
        raise TensorError(f"{where}: shape must be a list of non-negative integers, got {value!r}"[:300])
    return tuple(value)


def _array(spec: dict, where: str, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    name = _field(spec, "name", str, where)
    where = f"input '{name}'"
    datatype = _field(spec, "datatype", str, where)
    if datatype not in DATATYPES:
        raise TensorError(f"{where}: unknown datatype {datatype!r}; allowed: {', '.join(DATATYPES)}")
    shape = _shape(spec.get("shape"), where)
    dtype, count = numpy_dtype(datatype), math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise TensorError(f"{where}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                              "bytes of binary data left in the request")
        if size != count * dtype.itemsize:
            raise TensorError(f"{where}: {size} bytes of binary data for shape {list(shape)} of {datatype}, "
                              f"expected {count * dtype.itemsize}")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return Tensor(name, datatype, array.reshape(shape)), offset + size
    if "data" not in spec:
        raise TensorError(f"{where}: has no data (give 'data', or binary data with its binary_data_size)")
    try:
        array = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise TensorError(f"{where}: data is not a tensor of {datatype}: {e}"[:300]) from None
    if array.size != count:
        raise TensorError(f"{where}: {array.size} values in data for shape {list(shape)}, expected {count}")
    return Tensor(name, datatype, array.reshape(shape)), offset


def infer_path_params(path: str) -> dict[str, str] | None:
    """The model (and version) an infer call's path names, `/v2/models/{name}[/versions/{version}]/infer`;
    None for any other path. The server's hot path (api/server.py) and batch lines read paths with it."""
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return {"name": parts[0]}
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return {"name": parts[0], "version": parts[2]}
    return None


def decode_request(raw: bytes, header_length: int | None = None) -> InferRequest:
    """The request body (its JSON header first when `header_length` is given) as an `InferRequest`."""
    if header_length is not None and not 0 < header_length <= len(raw):
        raise TensorError(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(raw)} bytes")
    head, rest = (raw, b"") if header_length is None else (raw[:header_length], raw[header_length:])
    try:
        body = msgspec.json.decode(head)
    except msgspec.DecodeError as e:
        raise TensorError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise TensorError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise TensorError("the request body must be a JSON object")
    request_id = _field(body, "id", str, "request", required=False)
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError("request.parameters: must be an object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise TensorError("request.inputs: must be a non-empty list of tensors")
    binary, offset, tensors = memoryview(rest), 0, []
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise TensorError(f"request.inputs[{i}]: must be an object")
        tensor, offset = _array(spec, f"request.inputs[{i}]", binary, offset)
        if any(t.name == tensor.name for t in tensors):
            raise TensorError(f"input '{tensor.name}' is given twice")
        tensors.append(tensor)
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data belong to no input")
    binary_output = params.get("binary_data_output") is True
    return InferRequest(request_id, tuple(tensors), _requested(body.get("outputs"), binary_output), binary_output)


def _requested(outputs: object, binary_default: bool) -> tuple[RequestedOutput, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise TensorError("request.outputs: must be a list of objects")
    out = []
    for i, o in enumerate(outputs):
        name = _field(o, "name", str, f"request.outputs[{i}]")
        params = o.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        out.append(RequestedOutput(name, binary is True))
    return tuple(out)


def encode_result(result: InferResult) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when binary tensors follow it."""
    outputs, chunks = [], []
    for name, array, binary in result.outputs:
        entry = {"name": name, "datatype": from_numpy(array.dtype), "shape": list(array.shape)}
        if binary:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    body = {"model_name": result.model_name, "model_version": result.model_version, "outputs": outputs}
    if result.id is not None:
        body["id"] = result.id
    head = msgspec.json.encode(body)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
