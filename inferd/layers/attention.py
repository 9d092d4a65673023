"""Attention over the paged KV cache, behind a small backend interface.

The model hands every layer a flat batch: the new tokens of all scheduled
requests laid end to end (a prompt chunk and a decode token look the same). The
backend writes their K/V into cache slots given by `slot_mapping`, then attends
each request's queries to its whole context, read through its block table.

`TorchAttentionBackend` is the portable path (CPU, or CUDA without custom
kernels): it gathers each request's blocks into a padded batch and runs one
`scaled_dot_product_attention` call with a mask that is causal within the new
tokens and open over the cached prefix. Mask and gather indices are built once per
step in `prepare()` and shared by every layer. On the CPU, with the fused kernels
built (layers/cpu_kernels.py), the cache write and the decode group's attention
run in C++ and read the blocks in place, without the padded copy. A CUDA backend
with paged kernels can implement the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferd.layers import cpu_kernels, kv_storage
from inferd.layers.cpu_kernels import ops_for
from inferd.layers.kv_storage import QuantizedKV


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
class _Group:
    """Requests attended together: all single-token decodes, or the rest (padded)."""

    tables: torch.Tensor          # [b, max_blocks] these requests' block tables
    seq_lens: torch.Tensor        # [b] context length after this step
    query_index: torch.Tensor     # [b, max_q] flat-batch token index (padding repeats a valid one)
    query_valid: torch.Tensor     # [b, max_q] bool
    out_index: torch.Tensor       # [n] flat-batch index of each valid query, in order
    mask: torch.Tensor            # [b, 1, max_q, ctx] bool, True = attend
    ctx_len: int
    decode: bool                  # every query is a single new token


class TorchAttentionBackend(AttentionBackend):
    """Decodes (one new token) and prefill chunks are attended in separate groups, so
    a long chunk does not pad every decode in the batch to its length.

    `batch_invariant`: on the CPU with the fused kernels, every new token, a prompt's too,
    is attended as a decode is (one query over the cache up to its own position, the
    decode kernel), so a token's attention is the same bits however its prompt was cut
    into chunks and whatever shared its step; SDPA's blocking follows the chunk's shape.
    With batch-invariant matmuls (layers/quant_blocks.py) a request's logits then do not
    depend on its company, and prompt steps take the fused decode path too."""

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        qlens = torch.tensor(meta.query_lens, dtype=torch.int64)
        slens = torch.tensor(meta.seq_lens, dtype=torch.int64)
        if self.batch_invariant and device.type == "cpu" and cpu_kernels.available() and bool((qlens > 1).any()):
            meta.prepared = [self._per_token_group(meta.block_tables, qlens, slens, device)]
            return
        starts = torch.cumsum(qlens, 0) - qlens
        decode = qlens == 1
        groups = []
        for rows in (decode.nonzero().flatten(), (~decode).nonzero().flatten()):
            if len(rows):
                groups.append(self._group(meta.block_tables[rows.to(meta.block_tables.device)],
                                          qlens[rows], slens[rows], starts[rows], device))
        meta.prepared = groups

    @staticmethod
    def _group(tables, qlens, slens, starts, device) -> _Group:
        max_q, ctx = int(qlens.max()), int(slens.max())
        qi = torch.arange(max_q)
        valid = qi[None, :] < qlens[:, None]
        index = torch.where(valid, starts[:, None] + qi[None, :], starts[:, None])
        q_pos = (slens - qlens)[:, None] + qi[None, :]      # absolute position of each query
        mask = torch.arange(ctx)[None, None, :] <= q_pos[:, :, None]
        return _Group(tables, slens.to(device), index.to(device), valid.to(device),
                      index[valid].to(device), mask[:, None].to(device), ctx, max_q == 1)

    @staticmethod
    def _per_token_group(tables, qlens, slens, device) -> _Group:
        """Every new token as a request of its own: its request's block table, its position + 1
        as the context length."""
        owner = torch.repeat_interleave(torch.arange(len(qlens)), qlens)
        starts = torch.cumsum(qlens, 0) - qlens
        token = torch.arange(int(qlens.sum()))
        lens = (slens - qlens)[owner] + (token - starts[owner]) + 1
        ctx = int(slens.max())
        mask = torch.arange(ctx)[None, :] < lens[:, None]
        return _Group(tables[owner.to(tables.device)], lens.to(device), token[:, None].to(device),
                      torch.ones(len(token), 1, dtype=torch.bool, device=device), token.to(device),
                      mask[:, None, None].to(device), ctx, True)

    def forward(self, q, k, v, kv_cache, meta, scale):
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, blocks, block_size, KVH, D], or its int8
        form with scales (layers/kv_storage.py)."""
        quantized = isinstance(kv_cache, QuantizedKV)
        data = kv_cache.data if quantized else kv_cache
        k_cache, v_cache = data[0], data[1]
        scales = (kv_cache.scales[0], kv_cache.scales[1]) if quantized else (None, None)
        ops = ops_for(q) if not quantized or kv_cache.in_kernel_form else None
        if ops is not None:
            ops.write_kv(k_cache, v_cache, k, v, meta.slot_mapping, *scales)
        elif quantized:
            kv_storage.write(kv_cache, k, v, meta.slot_mapping)
        else:
            n_kv, dim = k_cache.shape[-2], k_cache.shape[-1]
            k_cache.view(-1, n_kv, dim).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, n_kv, dim).index_copy_(0, meta.slot_mapping, v)

        groups: list[_Group] = meta.prepared
        # a lone gathered group returns its own result; otherwise groups fill rows of out
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2]) if len(groups) > 1 or ops is not None else None
        for g in groups:
            if g.decode and ops is not None:
                # reads the blocks in place and writes each request's row of out
                ops.decode_attention(out, q, k_cache, v_cache, g.tables, g.seq_lens, g.out_index, scale, *scales)
                continue
            o = self._attend_gathered(q, kv_cache, g, scale)
            if out is None:
                return o  # one group holds every token, already in flat order
            out[g.out_index] = o
        return out

    @staticmethod
    def _attend_gathered(q, kv_cache, g: _Group, scale: float) -> torch.Tensor:
        """The group's attention over a padded copy of its blocks (dequantized when int8); rows in
        group order."""
        if isinstance(kv_cache, QuantizedKV):
            k_blocks, v_blocks = (kv_storage.gather(kv_cache, i, g.tables, q.dtype) for i in (0, 1))
        else:
            k_blocks, v_blocks = kv_cache[0][g.tables], kv_cache[1][g.tables]
        n_kv, dim = k_blocks.shape[-2], k_blocks.shape[-1]
        b = g.tables.shape[0]
        keys = k_blocks.view(b, -1, n_kv, dim)[:, : g.ctx_len].transpose(1, 2)
        values = v_blocks.view(b, -1, n_kv, dim)[:, : g.ctx_len].transpose(1, 2)
        if g.decode:
            return _decode_attention(q[g.query_index[:, 0]], keys, values, g.mask, scale)
        queries = q[g.query_index].transpose(1, 2)     # [b, H, max_q, D]
        o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask, scale=scale,
                                           enable_gqa=queries.shape[1] != n_kv)
        return o.transpose(1, 2)[g.query_valid].reshape(-1, q.shape[1] * dim)


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per request as two batched matmuls; for q_len 1 this is several times
    faster on CPU than SDPA's flash kernel. q: [b, H, D]; keys/values: [b, KVH, L, D]."""
    b, n_heads, dim = q.shape
    n_kv = keys.shape[1]
    # query heads that share a KV head become rows of one matmul (GQA without repeat)
    qg = q.view(b, n_kv, n_heads // n_kv, dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale    # [b, KVH, G, L]
    scores.masked_fill_(~mask.view(b, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, n_heads * dim)
