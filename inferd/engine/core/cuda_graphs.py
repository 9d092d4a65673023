"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

A decode step of a small model on a GPU is a few hundred short kernels, and launching
them from Python costs more than running them. At start-up the model's forward for
a decode-only step of each bucket size is captured once into a graph that reads its
inputs from persistent buffers (token ids, positions, cache slots, context lengths,
block tables); a step then writes its rows into those buffers in place and replays
the smallest bucket that holds it. The rows past the step's own are padding: slot -1
(the KV write skips it), context length 1 over block 0 (a finite read nobody uses).
Steps with prompt tokens, images, or more rows than the largest bucket run eagerly.

Capture is a parameter: `cuda_capture` records into torch.cuda.CUDAGraph with one
memory pool shared by all buckets (largest first), and `direct_capture` calls the
forward itself, which is how the buffer logic is tested on a machine without a GPU.
`--enforce-eager` (vLLM's name) turns graphs off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from inferd.layers.attention import AttentionMetadata

PAD_SLOT = -1
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def default_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64 and every 32 past it (vLLM's spacing, coarser), up to
    max_num_seqs, which is always a bucket."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(96, 513, 32))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def direct_capture(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """No graph: each replay calls the forward, reading the same buffers a graph would."""
    return forward


def cuda_capture() -> Capture:
    """Record each bucket into a CUDA graph; all share one memory pool, so capture largest first."""
    pool = torch.cuda.graph_pool_handle()

    def capture(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and settle the allocator outside the graph
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
    return capture


class DecodeGraphs:
    """model(ids, positions, caches, meta, backend) captured per bucket over persistent inputs;
    `backend` offers `decode_step(seq_lens, block_tables)` (layers/triton_attention.py)."""

    def __init__(self, model, kv_caches: list, backend, max_blocks: int, buckets: list[int],
                 device: torch.device, capture: Capture = direct_capture):
        self.buckets = sorted(buckets)
        rows = self.buckets[-1]
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), PAD_SLOT, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}
        for b in reversed(self.buckets):
            meta = AttentionMetadata(slot_mapping=self.slots[:b], query_lens=[1] * b, seq_lens=[1] * b,
                                     block_tables=self.block_tables[:b],
                                     prepared=backend.decode_step(self.seq_lens[:b], self.block_tables[:b]))

            def forward(b=b, meta=meta) -> torch.Tensor:
                return model(self.ids[:b], self.positions[:b], kv_caches, meta, backend)
            self.replays[b] = capture(forward)

    def bucket_for(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def run(self, ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor | None:
        """Final hidden states [rows, hidden] of a decode-only step, or None when it has more rows than
        the largest bucket (run it eagerly). The result is the graph's output buffer: read it before the
        next step."""
        n = len(ids)
        b = self.bucket_for(n)
        if b is None:
            return None
        pad = b - n
        self.ids[:b].copy_(torch.tensor(ids + [0] * pad))
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad))
        self.slots[:b].copy_(torch.tensor(slots + [PAD_SLOT] * pad))
        self.seq_lens[:b].copy_(torch.tensor(seq_lens + [1] * pad, dtype=torch.int32))
        # only the columns this step's rows use: the kernel reads no further than a row's own length
        width = max(len(t) for t in tables)
        table = torch.zeros(b, width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        self.block_tables[:b, :width].copy_(table)
        return self.replays[b]()[:n]
