"""Prometheus metrics for GET /metrics, with vLLM's metric names under `inferd:`.

Request timings arrive from each local engine's client as one `RequestMetrics`
per finished request (`EngineMetrics.observe`), measured on the API side where
clients see them: time to first token, inter-token latency, end-to-end latency
and queue time (arrival until the core first scheduled it). Engine gauges and
counters (running, waiting, KV usage and free blocks, preemptions, speculative
decoding's drafted and accepted tokens) are refreshed from each core's latest
stats at scrape time; the acceptance rate at draft position k is
`spec_decode_num_accepted_tokens_per_pos{position="k"} / spec_decode_num_drafts`.
Every series is labelled with the model name, so one registry covers every local
engine; each app gets its own registry, so several apps can live in one process.
Several engines under one model name (the replicas of a Ray deployment, or two
local deployments of a group) show as one: gauges are their sums, counters advance
by each engine's own increase (a restarted engine counts from zero again), and
`engine_healthy` is 1 only while all of them are.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inferd.engine.client.async_client import RequestMetrics
from inferd.engine.messages import EmbedStats, Stats

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
        1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        m = ["model_name"]
        self.ttft = Histogram("inferd:time_to_first_token_seconds", "Time to first token (s).",
                              m, buckets=_LATENCY, registry=r)
        self.itl = Histogram("inferd:inter_token_latency_seconds", "Time between output tokens (s).",
                             m, buckets=_ITL, registry=r)
        self.e2e = Histogram("inferd:e2e_request_latency_seconds", "Request latency, arrival to finish (s).",
                             m, buckets=_E2E, registry=r)
        self.queue = Histogram("inferd:request_queue_time_seconds", "Arrival until first scheduled (s).",
                               m, buckets=_E2E, registry=r)
        self.running = Gauge("inferd:num_requests_running", "Requests running in the engine.",
                             m, registry=r)
        self.waiting = Gauge("inferd:num_requests_waiting", "Requests waiting to be scheduled.",
                             m, registry=r)
        self.kv_usage = Gauge("inferd:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                              m, registry=r)
        self.kv_free = Gauge("inferd:kv_cache_free_blocks", "KV cache blocks free.",
                             m, registry=r)
        self.kv_total = Gauge("inferd:kv_cache_total_blocks", "KV cache blocks in the pool.",
                              m, registry=r)
        self.healthy = Gauge("inferd:engine_healthy", "1 while the engine core is alive and serving.",
                             m, registry=r)
        self.preemptions = Counter("inferd:num_preemptions", "Preemptions since start.",
                                   m, registry=r)
        self.prompt_tokens = Counter("inferd:prompt_tokens", "Prompt tokens processed.",
                                     m, registry=r)
        self.generation_tokens = Counter("inferd:generation_tokens", "Tokens generated.",
                                         m, registry=r)
        self._success = Counter("inferd:request_success", "Finished requests (samples) by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.prefix_queries = Counter("inferd:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      m, registry=r)
        self.prefix_hits = Counter("inferd:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                   m, registry=r)
        self.spec_drafts = Counter("inferd:spec_decode_num_drafts",
                                   "Speculative decoding: request-steps that verified draft tokens.", m, registry=r)
        self.spec_draft_tokens = Counter("inferd:spec_decode_num_draft_tokens",
                                         "Speculative decoding: draft tokens verified.", m, registry=r)
        self.spec_accepted_tokens = Counter("inferd:spec_decode_num_accepted_tokens",
                                            "Speculative decoding: draft tokens accepted.", m, registry=r)
        self.spec_accepted_per_pos = Counter("inferd:spec_decode_num_accepted_tokens_per_pos",
                                             "Speculative decoding: draft tokens accepted at each draft position.",
                                             ["model_name", "position"], registry=r)
        self.images_encoded = Counter("inferd:images_encoded", "Images run through a vision encoder.", m, registry=r)
        self.image_cache_hits = Counter("inferd:image_encoder_cache_hits",
                                        "Images whose encoder output was cached (by content hash).", m, registry=r)
        self.embed_requests = Counter("inferd:embedding_requests", "Embedding requests served.",
                                      m, registry=r)
        self.embed_batches = Counter("inferd:embedding_batches",
                                     "Dynamic batches the embedding model ran (requests / batches = batch size).",
                                     m, registry=r)
        self.embed_tokens = Counter("inferd:embedding_tokens", "Input tokens embedded.", m, registry=r)
        # each core reports totals since start; counters advance by the difference
        self._totals_seen: dict[tuple[str, str], int] = {}

    def observe(self, model: str, m: RequestMetrics) -> None:
        if m.first_token is not None:
            self.ttft.labels(model).observe(m.first_token - m.arrival)
        itl = self.itl.labels(model)
        for dt in m.inter_token:
            itl.observe(dt)
        if m.finished is not None:
            self.e2e.labels(model).observe(m.finished - m.arrival)
        if m.scheduled is not None:
            self.queue.labels(model).observe(max(0.0, m.scheduled - m.arrival))
            self.prompt_tokens.labels(model).inc(m.num_prompt_tokens)
        self.generation_tokens.labels(model).inc(m.num_generation_tokens)
        for reason in m.finish_reasons:
            self._success.labels(model, reason).inc()

    def update(self, model: str, reports: list[tuple[str, Stats | EmbedStats, bool]]) -> None:
        """The latest counters of the model processes serving `model`, as (deployment, stats, healthy)
        (engine cores' or embedding processes')."""
        engines = [(source, stats) for source, stats, _ in reports if isinstance(stats, Stats)]
        for source, stats, _ in reports:
            if isinstance(stats, EmbedStats):
                self._advance(model, source, stats, (("num_requests", self.embed_requests),
                                                     ("num_batches", self.embed_batches),
                                                     ("num_tokens", self.embed_tokens)))
        if engines:
            self._update_engines(model, engines, all(ok for _, stats, ok in reports if isinstance(stats, Stats)))

    def _update_engines(self, model: str, engines: list[tuple[str, Stats]], healthy: bool) -> None:
        stats = [s for _, s in engines]
        total_blocks = sum(s.num_blocks for s in stats)
        self.running.labels(model).set(sum(s.running for s in stats))
        self.waiting.labels(model).set(sum(s.waiting for s in stats))
        self.kv_usage.labels(model).set(sum(s.kv_usage * s.num_blocks for s in stats) / total_blocks
                                        if total_blocks else 0.0)
        self.kv_free.labels(model).set(sum(s.num_free_blocks for s in stats))
        self.kv_total.labels(model).set(total_blocks)
        self.healthy.labels(model).set(1 if healthy else 0)
        for source, s in engines:
            self._advance(model, source, s, (("num_preemptions", self.preemptions),
                                             ("prefix_cache_queries", self.prefix_queries),
                                             ("prefix_cache_hits", self.prefix_hits),
                                             ("spec_decode_num_drafts", self.spec_drafts),
                                             ("spec_decode_num_draft_tokens", self.spec_draft_tokens),
                                             ("spec_decode_num_accepted_tokens", self.spec_accepted_tokens),
                                             ("images_encoded", self.images_encoded),
                                             ("image_encoder_cache_hits", self.image_cache_hits)))
            for pos, total in enumerate(s.spec_decode_num_accepted_tokens_per_pos):
                self._add(self.spec_accepted_per_pos.labels(model, str(pos)),
                          (source, f"spec_decode_num_accepted_tokens_per_pos:{pos}"), total)

    def _advance(self, model: str, source: str, stats, counters) -> None:
        for name, counter in counters:
            self._add(counter.labels(model), (source, name), getattr(stats, name))

    def _add(self, child, key: tuple[str, str], total: int) -> None:
        """Advance `child` by what `total` (a count since its engine started) grew by since last seen."""
        seen = self._totals_seen.get(key, 0)
        if total < seen:  # the engine behind this source was restarted: it counts from zero again
            seen = 0
        if total > seen:
            child.inc(total - seen)
        self._totals_seen[key] = total


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
