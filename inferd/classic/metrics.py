"""Prometheus metrics of tensor models, on the server's one registry (GET /metrics).

Named after Triton's (`nv_inference_request_duration_us`, `nv_inference_queue_duration_us`, ...)
in seconds and under inferd's prefix: per model, the request time on the server (body read to
response), the time each request queued before its run, the compute time of each run, the rows
each run held (the batcher's batch size) and the requests answered by status.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from inferd.classic.batcher import BatchRecord

_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512,
            1.0, 2.5, 5.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class InferMetrics:
    def __init__(self, registry: CollectorRegistry):
        m, r = ["model_name"], registry
        self.request = Histogram("inferd:infer_request_duration_seconds",
                                 "Infer request time in the server, body read to response (s).",
                                 m, buckets=_SECONDS, registry=r)
        self.queue = Histogram("inferd:infer_queue_duration_seconds",
                               "Time an infer request waited in the batcher before its run (s).",
                               m, buckets=_SECONDS, registry=r)
        self.compute = Histogram("inferd:infer_compute_duration_seconds",
                                 "ONNX Runtime time of one batched run (s).", m, buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("inferd:infer_batch_size", "Rows in one ONNX Runtime run (the dynamic batch).",
                                    m, buckets=_ROWS, registry=r)
        self.requests = Counter("inferd:infer_requests", "Infer requests answered, by HTTP status.",
                                ["model_name", "status"], registry=r)

    def batch(self, model: str, record: BatchRecord) -> None:
        queue = self.queue.labels(model)
        for q in record.queue_s:
            queue.observe(q)
        self.compute.labels(model).observe(record.compute_s)
        self.batch_size.labels(model).observe(record.rows)

    def answered(self, model: str, status: int, seconds: float) -> None:
        self.request.labels(model).observe(seconds)
        self.requests.labels(model, str(status)).inc()
