"""The draft-model proposer: a smaller model with the target's tokenizer drafts greedily.

The draft is the argmax of the draft model, one token per position: a point mass,
so verification stays the existing rule (keep a draft while it equals the token the
target samples there, spec_decode/verify.py) and the output is exactly the
target's, greedy or sampled, seeded or not.

The draft model (`DraftModel`) is a model directory or GGUF file with the target's
vocabulary (refused at start otherwise), or, with no file, the target's own weights
sharing their tensors (`LlamaForCausalLM.sharing_weights`), at int8/int4 if asked:
the int4 self-draft. It has a KV pool of its own with the target's geometry (the
same block size and number of blocks, its own layers and heads), indexed by the
target's block ids and slots: a request's block table serves both models, so there
is no second block manager. `Request.num_draft_computed_tokens` counts the tokens
the draft holds KV for; the KV manager zeroes it when it frees the request's blocks
(preemption, finish, a failed admission) and cuts it to the kept tokens when it
gives the blocks of rejected drafts back, so rejected positions are written again
later. A prefix-cache hit starts at 0 as well: the draft recomputes the prompt into
the shared blocks (the same tokens give the same values), since nothing guarantees
that whoever filled them ran the draft over them.

`propose` drafts L_i tokens for each request i in L = max L_i forwards of the
draft, batched across requests: the first catches the draft up on the tokens it
has not seen (the whole prompt on first use, then the one or two tokens the last
verification added), the others feed each request its previous draft. A
constrained request drafts under its grammar's mask (its matcher advanced through
the drafts and rolled back after), so its drafts are ones the grammar allows; a
request stops drafting at an EOS or where its grammar is complete. The blocks
for the draft positions must exist before the draft writes them: the caller takes
them first (`Scheduler.reserve_draft_tokens`). Each forward's wall time is recorded
by rows (`cost`, measured at start for 1 to 64 rows), and `charge` says what
drafting would cost each request, so the policy can weigh the draft's work
against what drafts save.
"""

from __future__ import annotations

import logging
import time

import torch

from inferd.engine.core.guidance import apply_masks
from inferd.engine.core.model_runner import ModelRunner
from inferd.engine.core.request import Request
from inferd.engine.spec_decode.config import SpeculativeConfig
from inferd.engine.spec_decode.policy import DraftCharge, StepCost
from inferd.layers import kv_storage
from inferd.layers.attention import TorchAttentionBackend
from inferd.models.checkpoint import TokenizerSpec
from inferd.models.config import ModelConfig
from inferd.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

# a catch-up this short is laid out as one attention row per token (one query each, like the target's
# drafts, model_runner.py), so that the forward stays on the decode kernels; longer ones are one row
_ROW_PER_TOKEN_MAX = 4
_CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)


class DraftModel:
    def __init__(self, config: SpeculativeConfig, target: LlamaForCausalLM, target_tokenizer: TokenizerSpec,
                 device: torch.device, dtype: torch.dtype, gguf_terms: int | None = None):
        if config.model is None:
            self.model, self.cfg = target.sharing_weights(), target.cfg
            self.source = "the target's weights"
        else:
            from inferd.models.loader import build_model, load_checkpoint

            ckpt = load_checkpoint(config.model, progress=False)
            _check_vocabulary(config.model, ckpt, target.cfg, target_tokenizer)
            self.model, self.cfg = build_model(ckpt, dtype, device)
            if gguf_terms and config.quantization is None:  # as the target: the file's own blocks
                self.model.use_gguf_blocks(ckpt.quantized, gguf_terms)
            self.source = config.model
        if config.quantization is not None:
            self.model.quantize(config.quantization)
        self.device, self.dtype = device, dtype
        self.runner: ModelRunner | None = None  # once the pool is allocated
        self.cost = StepCost()  # seconds of one draft forward by its number of rows
        log.info("draft model: %s (%d layers)%s", self.source, self.cfg.num_layers,
                 f", {config.quantization}" if config.quantization else "")

    def bytes_per_block(self, block_size: int, kv_cache_dtype: str = "auto") -> int:
        c = self.cfg
        return c.num_layers * block_size * kv_storage.bytes_per_token(kv_cache_dtype, c.num_kv_heads, c.head_dim,
                                                                     self.dtype)

    def allocate(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> None:
        """The draft's KV pool: the target's block ids, the draft's own layers and heads, stored as the
        target's are (`kv_cache_dtype`)."""
        c = self.cfg
        caches = [kv_storage.allocate(kv_cache_dtype, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                      self.dtype, self.device) for _ in range(c.num_layers)]
        self.runner = ModelRunner(self.model, caches, block_size, TorchAttentionBackend(), self.device)
        self._calibrate()

    def _calibrate(self) -> None:
        """Time a forward at 1 to 64 rows, so that the policy knows what drafting for many requests costs
        before it first tries (a warm-up pass, then a measured one). Nothing is cached yet, so the scratch
        writes into block 0 are harmless: a request's draft reads only positions it wrote itself."""
        for measured in (False, True):
            for rows in _CALIBRATION_ROWS:
                self._argmax([0] * rows, [1] * rows, [1] * rows, [[0]] * rows, list(range(rows)), [None] * rows,
                             observe=measured)

    def lag(self, req: Request) -> int:
        """The tokens the draft has not seen yet: its next catch-up."""
        return req.num_tokens - min(req.num_draft_computed_tokens, req.num_tokens - 1)

    def lags_behind(self, req: Request) -> bool:
        """Whether the next catch-up is a long one (not just what the last verification added)."""
        return self.lag(req) > _ROW_PER_TOKEN_MAX

    def charge(self, reqs: list[Request], candidates: list[tuple[float, int]], remaining: list[int]) -> DraftCharge:
        """What drafting would cost each of reqs, for the policy (candidates[i]: its acceptance rate and most
        drafts; remaining[i]: its tokens to go). A short catch-up is rows of the first forward; a long one
        is also charged once, as one step's share of it over the request's remaining steps (at the tokens a
        step is expected to give), since every later draft of the request profits from it."""
        first_rows, once = [], []
        for req, (rate, k), left in zip(reqs, candidates, remaining):
            lag = self.lag(req)
            if not self.lags_behind(req):
                first_rows.append(lag)
                once.append(0.0)
            else:
                per_step = 1 + sum(rate ** j for j in range(1, k + 1))
                first_rows.append(1)
                once.append(self.cost.estimate(lag) * min(1.0, per_step / max(left, 1)))
        return DraftCharge(self.cost, first_rows, once)

    @torch.inference_mode()
    def propose(self, reqs: list[Request], lengths: list[int]) -> list[list[int]]:
        """lengths[i] (>= 1) greedy draft tokens for reqs[i], whose blocks must cover num_tokens + lengths[i]."""
        ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        last: list[int] = []  # flat index of each request's last known token
        for req in reqs:  # forward 1: what the draft has not seen, up to the request's last known token
            end = req.num_tokens
            start = min(req.num_draft_computed_tokens, end - 1)
            ids.extend(req.token_ids[start:end])
            last.append(len(ids) - 1)
            if end - start <= _ROW_PER_TOKEN_MAX:
                query_lens.extend([1] * (end - start))
                seq_lens.extend(range(start + 1, end + 1))
                tables.extend([req.block_ids] * (end - start))
            else:
                query_lens.append(end - start)
                seq_lens.append(end)
                tables.append(req.block_ids)
        drafts: list[list[int]] = [[] for _ in reqs]
        consumed = [0] * len(reqs)  # draft tokens each request's grammar matcher was advanced by
        active = list(range(len(reqs)))
        try:
            for j in range(max(lengths)):
                if j:  # forward j + 1: each request's j-th draft in, the next one out
                    ids = [drafts[i][-1] for i in active]
                    query_lens, last = [1] * len(active), list(range(len(active)))
                    seq_lens = [reqs[i].num_tokens + j for i in active]
                    tables = [reqs[i].block_ids for i in active]
                tokens = self._argmax(ids, query_lens, seq_lens, tables, last, [reqs[i].matcher for i in active])
                going = []
                for i, t in zip(active, tokens):
                    drafts[i].append(t)
                    if len(drafts[i]) == lengths[i] or t in reqs[i].eos_token_ids:
                        continue  # nothing is drafted after an end
                    m = reqs[i].matcher
                    if m is not None:
                        # the next draft is proposed under the grammar's mask after this one
                        if not m.consume_token(t):
                            continue
                        consumed[i] += 1
                        if m.is_stopped():
                            continue
                    going.append(i)
                active = going
                if not active:
                    break
        finally:
            for req, n in zip(reqs, consumed):
                if n:
                    req.matcher.rollback(n)
        for req, d in zip(reqs, drafts):
            # its KV now covers the known tokens and all drafts but the last (never fed back in)
            req.num_draft_computed_tokens = req.num_tokens + len(d) - 1
        return drafts

    def _argmax(self, ids, query_lens, seq_lens, tables, rows, matchers, observe: bool = True) -> list[int]:
        started = time.perf_counter()
        hidden = self.runner.forward(ids, query_lens, seq_lens, tables)
        logits = apply_masks(self.model.compute_logits(hidden[rows]).float(), matchers)
        tokens = logits.argmax(-1).tolist()
        if observe:
            self.cost.observe(len(ids), time.perf_counter() - started)
        return tokens


def _check_vocabulary(path: str, ckpt, target_cfg: ModelConfig, target_tokenizer: TokenizerSpec) -> None:
    """A draft token is a target token only if both models read ids the same way: refuse any other draft."""
    from tokenizers import Tokenizer

    cfg = ModelConfig.from_hf(ckpt.config)
    if cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"speculative_config.model: {path!r} has a vocabulary of {cfg.vocab_size} tokens, the "
                         f"target {target_cfg.vocab_size}; a draft model needs the target's tokenizer")
    ours = Tokenizer.from_str(target_tokenizer.tokenizer_json).get_vocab(with_added_tokens=True)
    theirs = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json).get_vocab(with_added_tokens=True)
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f"speculative_config.model: {path!r} has another tokenizer than the target (e.g. "
                         f"{', '.join(f'{t!r} = {i}' for t, i in differ)} in one only); a draft model needs the "
                         "target's tokenizer")
