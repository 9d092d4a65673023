"""Classic ML: tabular and tensor models (ONNX files, scikit-learn pipelines) run by ONNX Runtime.

The parts, from the wire down:
- `datatypes.py`: the Open Inference Protocol's tensor datatypes and their numpy and ONNX names.
- `tensors.py`: a /v2 infer request (JSON tensors, or Triton's binary tensor extension) decoded
  into typed `Tensor`s, and a result encoded back.
- `signature.py`: a model's inputs and outputs (name, datatype, shape) and the check of a
  request against them; each mistake is a `TensorError` naming the input.
- `loader.py`: a model file to ONNX bytes (scikit-learn models are converted at load).
- `session.py`: an ONNX Runtime session with thread settings that leave the LLM engine its cores.
- `batcher.py`: the dynamic batcher: concurrent requests concatenated along the batch dimension
  and run in one ONNX Runtime call, on a thread off the event loop.
- `metrics.py`: Prometheus histograms of request time, queue time and batch size.
- `examples.py` (its command: cli/examples.py): `inferd examples fraud | recommender`.

Nothing here imports the web framework or the gateway; `providers/onnx.py` makes a model a
gateway deployment and `api/routes_infer.py` serves the protocol. onnxruntime, onnx, skl2onnx
and scikit-learn are the optional `classic-ml` extra, imported only when a model is loaded.
"""
