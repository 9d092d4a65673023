"""The CUDA attention backend: the KV write and one paged attention kernel per layer (Triton).

Same interface as layers/attention.py's TorchAttentionBackend: `prepare` lays the
step out once (query starts, context lengths, the launch's tiles, all int32 on the
device, sent in one copy), `forward` writes the new K/V into their slots and attends
every new token, decode or prompt chunk, in one launch that reads the block table in
place (layers/triton_ops/paged_attention.py). int8 / fp8 caches are written and read
as levels with scales (layers/kv_storage.py).

`decode_step` lays out a decode-only step over persistent buffers without touching
the host, which is what a captured CUDA graph replays (engine/core/cuda_graphs.py):
one tile per row and query starts 0..B, so only the buffers' contents change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferd.layers import triton_ops
from inferd.layers.attention import AttentionBackend, AttentionMetadata
from inferd.layers.kv_storage import QuantizedKV
from inferd.layers.triton_ops import paged_attention as pa


@dataclass
class TritonStep:
    query_start: torch.Tensor   # [B+1] int32: each row's first token in the flat batch
    seq_lens: torch.Tensor      # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, W]
    tiles: torch.Tensor         # [2, tiles] int32: (row, first token) of each tile
    block_q: int


class TritonAttentionBackend(AttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int):
        self.group = num_heads // num_kv_heads

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        qlens = meta.query_lens
        block_q = pa.block_q_for(self.group, prompt=max(qlens) > 1)
        tiles = pa.tiles(qlens, block_q)
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        b, t = len(qlens), len(tiles[0])
        host = torch.tensor(starts + list(meta.seq_lens) + tiles[0] + tiles[1], dtype=torch.int32)
        packed = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        meta.prepared = TritonStep(packed[:b + 1], packed[b + 1:2 * b + 1], meta.block_tables,
                                   packed[2 * b + 1:].view(2, t), block_q)

    def decode_step(self, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> TritonStep:
        """A decode-only step of seq_lens.shape[0] rows read from these (persistent) buffers."""
        b = seq_lens.shape[0]
        rows = torch.arange(b, dtype=torch.int32, device=seq_lens.device)
        tiles = torch.stack([rows, torch.zeros_like(rows)])
        query_start = torch.arange(b + 1, dtype=torch.int32, device=seq_lens.device)
        return TritonStep(query_start, seq_lens, block_tables, tiles, pa.block_q_for(self.group, prompt=False))

    def forward(self, q, k, v, kv_cache, meta, scale):
        kernels = triton_ops.kernels()
        step: TritonStep = meta.prepared
        if isinstance(kv_cache, QuantizedKV):
            k_cache, v_cache = kv_cache.data[0], kv_cache.data[1]
            scales = (kv_cache.scales[0], kv_cache.scales[1])
        else:
            k_cache, v_cache = kv_cache[0], kv_cache[1]
            scales = (None, None)
        kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping, *scales)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        kernels.paged_attention(out, q, k_cache, v_cache, *scales, step.block_tables, step.seq_lens,
                                step.query_start, step.tiles, step.block_q, scale)
        return out
