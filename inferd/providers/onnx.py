"""`OnnxDeployment`: a tensor model (ONNX, or scikit-learn converted at load) as a gateway deployment.

It loads the model on `start` (off the event loop: a scikit-learn conversion takes a while),
and answers the `infer` endpoint: the typed request's body is the decoded `InferRequest`,
which is checked against the model's signature (a 400 naming the input when it does not fit),
run through the model's `DynamicBatcher`, and returned as an `InferResult`. A deployment serves
one version of its model; it also answers `infer@<version>`, so a request for a version is
routed only to deployments of that version. Streaming makes no sense for tensors and is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from inferd.classic.batcher import BatcherClosed, BatchRecord, DynamicBatcher
from inferd.classic.session import OnnxModel
from inferd.classic.signature import Signature
from inferd.classic.tensors import InferRequest, InferResult, TensorError
from inferd.providers.base import Deployment
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.request import InferenceRequest


def _invalid(message: str) -> InferdError:
    return InferdError(ErrorKind.INVALID_REQUEST, message, status=400)


class OnnxDeployment(Deployment):
    platform = "onnxruntime_onnx"

    def __init__(self, name: str, model_name: str, path: str, *, version: str = "1", max_batch_size: int = 64,
                 max_queue_delay_s: float = 0.0, intra_op_num_threads: int = 1):
        self.name, self.model_name, self.path, self.version = name, model_name, path, version
        self.endpoints = frozenset({"infer", f"infer@{version}"})
        self.max_batch_size, self.max_queue_delay_s = max_batch_size, max_queue_delay_s
        self.intra_op_num_threads = intra_op_num_threads
        self.model: OnnxModel | None = None
        self.batcher: DynamicBatcher | None = None
        self.on_batch: Callable[[BatchRecord], None] | None = None  # set by the API for its metrics

    async def start(self) -> None:
        try:
            self.model = await asyncio.to_thread(OnnxModel.load, self.path, self.intra_op_num_threads)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        self.batcher = DynamicBatcher(self.model.run, max_batch_size=self.max_batch_size,
                                      max_queue_delay_s=self.max_queue_delay_s,
                                      batchable=self.model.signature.batchable, name=self.model_name,
                                      on_batch=self._batch_done)
        self.batcher.start()

    def _batch_done(self, record: BatchRecord) -> None:
        if self.on_batch is not None:
            self.on_batch(record)

    @property
    def signature(self) -> Signature:
        assert self.model is not None, "the deployment has not been started"
        return self.model.signature

    @property
    def healthy(self) -> bool:
        return self.batcher is not None and self.batcher.running

    async def request(self, request: InferenceRequest) -> InferResult:
        if not request.endpoint.startswith("infer"):
            raise _invalid(f"{self.model_name!r} is a tensor model; use /v2/models/{self.model_name}/infer")
        req: InferRequest = request.body
        try:
            feeds, rows = self.signature.feeds(req, self.model_name)
            wanted = self.signature.requested(req)
        except TensorError as e:
            raise _invalid(str(e)) from None
        if self.batcher.max_batch_size and rows > self.batcher.max_batch_size:
            raise _invalid(f"inference request batch-size must be <= {self.batcher.max_batch_size} for "
                           f"'{self.model_name}', got {rows} rows")
        try:
            outputs = await self.batcher.submit(feeds, rows)
        except BatcherClosed:
            raise self.unavailable() from None
        except Exception as e:  # noqa: BLE001 - inputs fit the signature: what is left is the data
            raise _invalid(f"ONNX Runtime could not run '{self.model_name}' on this input: "
                           f"{str(e).splitlines()[0][:400]}") from None
        return InferResult(self.model_name, self.version, req.id,
                           tuple((o.name, outputs[o.name], o.binary) for o in wanted), rows)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[dict]:
        raise _invalid(f"{self.model_name!r} is a tensor model; it does not stream")
        yield {}  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        if self.batcher is not None:
            await self.batcher.aclose()
