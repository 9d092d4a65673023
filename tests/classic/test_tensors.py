"""The /v2 wire format: JSON and binary tensors in, outputs back in the form tritonclient reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inferd.classic.tensors import InferResult, TensorError, decode_request, encode_result


def body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def test_json_tensors_flat_or_nested_take_their_shape_and_dtype():
    req = decode_request(body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]},
                              {"name": "ids", "shape": [2], "datatype": "INT64", "data": [7, 8]}, id="q1"))
    x, ids = req.inputs
    assert req.id == "q1" and req.outputs is None and not req.binary_output
    assert x.array.dtype == np.float32 and x.shape == (2, 3) and x.array[1, 2] == 6
    assert ids.array.dtype == np.int64 and ids.array.tolist() == [7, 8]
    flat = decode_request(body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}))
    np.testing.assert_array_equal(flat.inputs[0].array, x.array)


def test_binary_tensors_follow_the_json_header():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([True, False])
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": b.nbytes}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]}).encode()
    req = decode_request(head + a.tobytes() + b.tobytes(), len(head))
    np.testing.assert_array_equal(req.inputs[0].array, a)
    np.testing.assert_array_equal(req.inputs[1].array, b)
    assert [(o.name, o.binary) for o in req.outputs] == [("y", True), ("z", False)]


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "x", "shape": [2], "datatype": "FP23", "data": [1, 2]}], "input 'x': unknown datatype 'FP23'"),
    ([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}], "input 'x': 3 values in data for "
                                                                               "shape [2, 2], expected 4"),
    ([{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}], "input 'x': data is not a tensor"),
    ([{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}], "input 'x': shape must be a list"),
    ([{"name": "x", "shape": [1], "datatype": "FP32"}], "input 'x': has no data"),
    ([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2, "input 'x' is given twice"),
    ([{"shape": [1], "datatype": "FP32", "data": [1]}], "request.inputs[0].name: must be given"),
    ([], "request.inputs: must be a non-empty list"),
])
def test_malformed_tensors_name_what_is_wrong(inputs, message):
    with pytest.raises(TensorError) as e:
        decode_request(body(*inputs))
    assert message in str(e.value)


def test_binary_sizes_must_match_shape_and_body():
    head = json.dumps({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    with pytest.raises(TensorError, match="input 'a': 4 bytes of binary data for shape \\[2\\] of FP32, expected 8"):
        decode_request(head + b"\0" * 4, len(head))
    with pytest.raises(TensorError, match="does not fit"):
        decode_request(head, len(head))
    with pytest.raises(TensorError, match="not valid JSON"):
        decode_request(b"{nope")


def test_results_read_back_by_tritonclient():
    from tritonclient.http import InferResult as TritonResult

    y = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    label = np.array([1, 0], dtype=np.int64)
    result = InferResult("m", "1", "req-9", (("y", y, True), ("label", label, False)), rows=2)
    raw, header_length = encode_result(result)
    parsed = TritonResult.from_response_body(raw, header_length=header_length)
    np.testing.assert_array_equal(parsed.as_numpy("y"), y)
    np.testing.assert_array_equal(parsed.as_numpy("label"), label)
    assert parsed.get_response()["id"] == "req-9"
    raw, header_length = encode_result(InferResult("m", "1", None, (("label", label, False),), rows=2))
    assert header_length is None and json.loads(raw)["outputs"][0]["data"] == [1, 0]
