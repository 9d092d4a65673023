"""Attention over the paged KV cache, behind a small backend interface.

The model hands every layer a flat batch: the new tokens of all scheduled
requests laid end to end (a prompt chunk and a decode token look the same). The
backend writes their K/V into cache slots given by `slot_mapping`, then attends
each request's queries to its whole context, read through its block table.

`TorchAttentionBackend` is the portable path (CPU, or CUDA without custom
kernels): it gathers each request's blocks into a padded batch and runs one
`scaled_dot_product_attention` call with a mask that is causal within the new
tokens and open over the cached prefix. Mask and gather indices are built once per
step in `prepare()` and shared by every layer. A CUDA backend with paged kernels
can implement the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat batch, shared by all layers."""

    slot_mapping: torch.Tensor      # [T] cache slot for each new token
    query_lens: list[int]           # new tokens per request
    seq_lens: list[int]             # context length per request after this step
    block_tables: torch.Tensor      # [B, max_blocks] block ids (padding is 0)
    # filled by the backend's prepare()
    prepared: object = None


class AttentionBackend:
    """Interface: prepare per-step metadata once, then run attention per layer."""

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class _TorchPrepared:
    decode_only: bool
    query_index: torch.Tensor | None   # [B, max_q] index into the flat batch (padded)
    query_valid: torch.Tensor | None   # [B, max_q] bool
    mask: torch.Tensor                 # [B, 1, max_q, L] bool, True = attend
    ctx_len: int                       # L = max_blocks * block_size, trimmed


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        qlens = torch.tensor(meta.query_lens, dtype=torch.int64)
        slens = torch.tensor(meta.seq_lens, dtype=torch.int64)
        max_q = int(qlens.max())
        ctx = int(slens.max())
        key_pos = torch.arange(ctx)
        if max_q == 1:
            mask = (key_pos[None, :] < slens[:, None])[:, None, None, :]
            meta.prepared = _TorchPrepared(True, None, None, mask.to(device), ctx)
            return
        starts = torch.cumsum(qlens, 0) - qlens
        qi = torch.arange(max_q)
        valid = qi[None, :] < qlens[:, None]
        index = torch.where(valid, starts[:, None] + qi[None, :], 0)
        # absolute position of query i of request b
        q_pos = (slens - qlens)[:, None] + qi[None, :]
        mask = key_pos[None, None, :] <= q_pos[:, :, None]
        # padded query rows attend to key 0 only, so softmax stays finite
        mask = mask & valid[:, :, None] | (~valid[:, :, None] & (key_pos == 0)[None, None, :])
        meta.prepared = _TorchPrepared(False, index.to(device), valid.to(device),
                                       mask[:, None].to(device), ctx)

    def forward(self, q, k, v, kv_cache, meta, scale):
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, blocks, block_size, KVH, D]."""
        p: _TorchPrepared = meta.prepared
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        n_kv, dim = k_cache.shape[-2], k_cache.shape[-1]
        k_cache.view(-1, n_kv, dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, n_kv, dim).index_copy_(0, meta.slot_mapping, v)

        b = meta.block_tables.shape[0]
        keys = k_cache[meta.block_tables].view(b, -1, n_kv, dim)[:, : p.ctx_len].transpose(1, 2)
        values = v_cache[meta.block_tables].view(b, -1, n_kv, dim)[:, : p.ctx_len].transpose(1, 2)
        if p.decode_only:
            queries = q.unsqueeze(2)                     # [B, H, 1, D]
        else:
            queries = q[p.query_index].transpose(1, 2)   # [B, H, max_q, D]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=p.mask, scale=scale,
            enable_gqa=queries.shape[1] != n_kv)
        out = out.transpose(1, 2)                        # [B, max_q, H, D]
        if p.decode_only:
            return out.reshape(q.shape[0], -1)
        return out[p.query_valid].reshape(q.shape[0], -1)
