"""A model's signature (its inputs and outputs) and the check of a request against it.

Shapes use -1 for a dimension the model leaves free. A model whose every input and output has a
free first dimension is batchable: that dimension is the batch, requests may carry any number of
rows, and the batcher concatenates requests along it. `feeds` returns what ONNX Runtime is given
and how many rows (predictions) the request holds; every mismatch is a `TensorError` naming the
input and saying what the model expects, as Triton words it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inferd.classic.datatypes import from_onnx
from inferd.classic.tensors import InferRequest, RequestedOutput, TensorError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: free

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _dims(shape) -> tuple[int, ...]:
    # ONNX Runtime gives a free dimension as a name (str) or None
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, session) -> Signature:
        """The signature of an onnxruntime.InferenceSession."""
        def specs(args):
            return tuple(TensorSpec(a.name, from_onnx(a.type), _dims(a.shape)) for a in args)
        return cls(specs(session.get_inputs()), specs(session.get_outputs()))

    @property
    def batchable(self) -> bool:
        return all(s.shape and s.shape[0] == -1 for s in (*self.inputs, *self.outputs))

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def feeds(self, request: InferRequest, model: str) -> tuple[dict[str, np.ndarray], int]:
        """The arrays to run and the request's number of rows; TensorError if they do not fit."""
        given = {t.name: t for t in request.inputs}
        expected = {s.name: s for s in self.inputs}
        for name in given:
            if name not in expected:
                raise TensorError(f"unexpected inference input '{name}' for model '{model}'; its inputs are "
                                  + ", ".join(f"'{n}'" for n in expected))
        missing = [n for n in expected if n not in given]
        if missing:
            raise TensorError(f"expected inference input {', '.join(repr(n) for n in missing)} for model "
                              f"'{model}'")
        feeds, rows = {}, None
        for spec in self.inputs:
            tensor = given[spec.name]
            if tensor.datatype != spec.datatype:
                raise TensorError(f"unexpected datatype {tensor.datatype} for inference input '{spec.name}', "
                                  f"expecting {spec.datatype}")
            shape = tensor.shape
            if len(shape) != len(spec.shape) or any(e != -1 and e != d for e, d in zip(spec.shape, shape)):
                raise TensorError(f"unexpected shape for input '{spec.name}' for model '{model}'. "
                                  f"Expected {list(spec.shape)}, got {list(shape)}")
            if self.batchable:
                if shape[0] == 0:
                    raise TensorError(f"input '{spec.name}': the batch dimension must hold at least one row")
                if rows is not None and shape[0] != rows:
                    raise TensorError(f"input '{spec.name}' has {shape[0]} rows but the other inputs have {rows}")
                rows = shape[0]
            feeds[spec.name] = tensor.array
        return feeds, rows or 1

    def requested(self, request: InferRequest) -> tuple[RequestedOutput, ...]:
        """The outputs to return: those asked for (checked), else all of them."""
        if request.outputs is None:
            return tuple(RequestedOutput(n, request.binary_output) for n in self.output_names)
        for o in request.outputs:
            if o.name not in self.output_names:
                raise TensorError(f"unexpected inference output '{o.name}'; the model's outputs are "
                                  + ", ".join(f"'{n}'" for n in self.output_names))
        return request.outputs
