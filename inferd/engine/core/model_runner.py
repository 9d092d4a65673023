"""Runs one scheduler step on the model: flat batch in, next tokens out.

Builds the flat batch (token ids, positions, cache slots, block tables) from the
scheduler's per-request token counts, runs the model once, and computes logits
only where they are needed: the last position of each request that reached the
end of its tokens (it samples), plus every prompt position of requests that asked
for prompt logprobs.
"""

from __future__ import annotations

import torch

from inferd.engine.core.request import Request
from inferd.engine.core.sampler import position_logprobs, sample
from inferd.engine.core.scheduler import SchedulerOutput, StepResult
from inferd.engine.messages import PositionLogprobs
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

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        prompt_lp: list[tuple[Request, int, int, int]] = []  # req, flat start, first pos, count
        bs = self.block_size
        for req in out.requests:
            n = out.num_new_tokens[req.request_id]
            start = req.num_computed_tokens
            flat_start = len(ids)
            ids.extend(req.token_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if start + n == req.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(req)
            if req.wants_prompt_logprobs:
                # position p predicts prompt token p+1; report those not yet reported
                first = max(start, req.num_prompt_logprobs_done)
                last = min(start + n, req.num_prompt_tokens - 1)
                if last > first:
                    prompt_lp.append((req, flat_start + first - start, first, last - first))

        max_blocks = max(len(r.block_ids) for r in out.requests)
        tables = torch.tensor([r.block_ids + [0] * (max_blocks - len(r.block_ids))
                               for r in out.requests], dtype=torch.long)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_lens=[out.num_new_tokens[r.request_id] for r in out.requests],
            seq_lens=[r.num_computed_tokens + out.num_new_tokens[r.request_id] for r in out.requests],
            block_tables=tables.to(self.device),
        )
        self.backend.prepare(meta, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device),
                            torch.tensor(positions, device=self.device),
                            self.kv_caches, meta, self.backend)

        result = StepResult(sampled={})
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows]).cpu()
            tokens, lps = sample(logits, sample_reqs)
            for req, tok, lp in zip(sample_reqs, tokens, lps):
                result.sampled[req.request_id] = tok
                if lp is not None:
                    result.logprobs[req.request_id] = lp
        for req, flat_start, first, count in prompt_lp:
            result.prompt_logprobs[req.request_id] = self._prompt_logprobs(
                hidden[flat_start:flat_start + count], req, first)
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, req: Request, first: int) -> list[PositionLogprobs]:
        lp = torch.log_softmax(self.model.compute_logits(hidden).float().cpu(), dim=-1)
        targets = req.prompt_token_ids[first + 1:first + 1 + hidden.shape[0]]
        return [position_logprobs(lp[i], t, req.params.prompt_logprobs) for i, t in enumerate(targets)]
