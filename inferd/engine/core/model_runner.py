"""Runs one scheduler step on the model: flat batch in, next tokens out.

Builds the flat batch (token ids, positions, cache slots, block tables) from the
scheduler's per-request token counts, runs the model once, and computes logits
only where they are needed: the last position of each request that reached the
end of its tokens (it samples), plus every prompt position of requests that asked
for prompt logprobs.

A request with draft tokens (engine/spec_decode/) computes them after its known
tokens and samples at each of their positions; `verify.accepted` then decides what
it keeps. Each draft is laid out for attention as a row of its own with one query
(the same block table, the context growing by one per row): the KV of every token
is written before any row attends, so this is exactly causal attention, and it runs
on the decode kernels (and the one-call CPU decode path) that plain decoding uses,
so drafts are cheap and their logits are those plain decoding would compute.

A vision-language request's image tokens take its images' encoder output in place of
their token embeddings, for whichever of them fall in the step's positions (a prefill
chunk may hold part of an image; engine/core/image_prompt.py).

On a GPU, decode-only steps replay a captured CUDA graph (engine/core/cuda_graphs.py)
instead of launching the forward's kernels one by one.
"""

from __future__ import annotations

import torch

from inferd.engine.core.guidance import draft_masks
from inferd.engine.core.request import Request
from inferd.engine.core.sampler import position_logprobs, sample
from inferd.engine.core.scheduler import SchedulerOutput, StepResult
from inferd.engine.messages import PositionLogprobs
from inferd.engine.spec_decode.verify import DraftRow, accepted
from inferd.layers.attention import AttentionBackend, AttentionMetadata
from inferd.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor],
                 block_size: int, backend: AttentionBackend, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.graphs = None  # DecodeGraphs (engine/core/cuda_graphs.py) on a GPU unless --enforce-eager

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        ids: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list = []   # a Request, or a DraftRow per draft position
        spec: list[tuple[Request, int]] = []  # requests with drafts, index of their first sample row
        prompt_lp: list[tuple[Request, int, int, int]] = []  # req, flat start, first pos, count
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        with_images: list[tuple[Request, int, int]] = []  # req, flat start, first position
        for req in out.requests:
            n = out.num_new_tokens[req.request_id]
            start = req.num_computed_tokens
            flat_start = len(ids)
            if req.image_prompt is not None:
                with_images.append((req, flat_start, start))
            known = req.num_tokens
            if start + n <= known:
                ids.extend(req.token_ids[start:start + n])
            else:
                ids.extend(req.token_ids[start:])
                ids.extend(req.spec_token_ids[:start + n - known])
            table = req.block_ids
            num_drafts = max(0, start + n - known)
            query_lens.append(n - num_drafts)
            seq_lens.append(start + n - num_drafts)
            tables.append(table)
            if num_drafts:
                # one attention row per draft, each seeing the context up to itself
                query_lens.extend([1] * num_drafts)
                seq_lens.extend(range(known + 1, known + num_drafts + 1))
                tables.extend([table] * num_drafts)
                spec.append((req, len(sample_rows)))
                sample_rows.extend(range(len(ids) - num_drafts - 1, len(ids)))
                masks = (draft_masks(req.matcher, req.spec_token_ids, self.model.cfg.vocab_size)
                         if req.matcher is not None else [None] * (num_drafts + 1))
                sample_reqs.extend(DraftRow(req, i, masks[i]) for i in range(num_drafts + 1))
            elif start + n == known:
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(req)
            if req.wants_prompt_logprobs:
                # position p predicts prompt token p+1; report those not yet reported
                first = max(start, req.num_prompt_logprobs_done)
                last = min(start + n, req.num_prompt_tokens - 1)
                if last > first:
                    prompt_lp.append((req, flat_start + first - start, first, last - first))
        hidden = self.forward(ids, query_lens, seq_lens, tables, self._image_embeds(with_images, out))

        result = StepResult(sampled={})
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])  # stays on the device: sample() is there
            tokens, lps = sample(logits, sample_reqs)
            for row, tok, lp in zip(sample_reqs, tokens, lps):
                if isinstance(row, Request):
                    result.sampled[row.request_id] = [tok]
                    if lp is not None:
                        result.logprobs[row.request_id] = [lp]
            for req, first in spec:
                drafts = req.spec_token_ids
                rows = range(first, first + len(drafts) + 1)
                kept = accepted([tokens[i] for i in rows], drafts)
                result.sampled[req.request_id] = kept
                result.num_drafts[req.request_id] = len(drafts)
                if req.params.logprobs is not None:
                    result.logprobs[req.request_id] = [lps[i] for i in rows[:len(kept)]]
        for req, flat_start, first, count in prompt_lp:
            result.prompt_logprobs[req.request_id] = self._prompt_logprobs(
                hidden[flat_start:flat_start + count], req, first)
        return result

    def forward(self, ids: list[int], query_lens: list[int], seq_lens: list[int],
                tables: list[list[int]], image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Final hidden states for a flat batch of attention rows: row r holds the next query_lens[r] of
        ids, the last of them at position seq_lens[r] - 1, its KV written into the blocks tables[r];
        `image_embeds` (flat rows, embeddings) replace those rows' token embeddings."""
        bs = self.block_size
        positions: list[int] = []
        slots: list[int] = []
        for q, end, table in zip(query_lens, seq_lens, tables):
            pos = range(end - q, end)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
        if self.graphs is not None and image_embeds is None and len(ids) == len(query_lens):
            hidden = self.graphs.run(ids, positions, slots, seq_lens, tables)  # decode-only: a replay
            if hidden is not None:
                return hidden
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables.to(self.device),
        )
        self.backend.prepare(meta, self.device)
        return self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                          self.kv_caches, meta, self.backend, image_embeds)

    def _image_embeds(self, with_images: list[tuple[Request, int, int]],
                      out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat rows, embeddings) of the image tokens this step computes, or None."""
        rows: list[int] = []
        embeds: list[torch.Tensor] = []
        for req, flat_start, start in with_images:
            images = req.image_prompt
            lo, hi = images.span(start, start + out.num_new_tokens[req.request_id])
            if lo < hi:
                rows.extend(flat_start + p - start for p in images.positions[lo:hi])
                embeds.append(images.embeds[lo:hi])
        if not rows:
            return None
        return torch.tensor(rows, device=self.device), torch.cat(embeds)

    def _prompt_logprobs(self, hidden: torch.Tensor, req: Request, first: int) -> list[PositionLogprobs]:
        lp = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
        targets = req.prompt_token_ids[first + 1:first + 1 + hidden.shape[0]]
        return [position_logprobs(lp[i], t, req.params.prompt_logprobs) for i, t in enumerate(targets)]
