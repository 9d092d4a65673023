"""Turn last-position logits into next tokens, per request's own parameters.

Order of operations (as vLLM): logprobs are taken from the raw model logits;
then penalties (repetition on prompt+output, frequency/presence on output),
`logit_bias`, the grammar's mask for constrained requests (engine/core/guidance.py),
min_tokens masking of stop ids (never down to nothing: the grammar wins), then
greedy argmax or temperature / top-k / top-p / min-p filtering and sampling.

Sampling draws exponential noise `q` and picks `argmax(p / q)`, which is an exact
sample from `p`. A seeded request draws its noise from its own generator, one row
at a time, reseeded from (seed, output position): its tokens depend neither on what
else is in the batch nor on how many positions a step samples for it, which is what
lets speculative decoding (engine/spec_decode/verify.py) give the same tokens as
plain decoding. `reqs` are requests, or a request at a draft position (`DraftRow`),
which offers the same fields.

Everything runs on the logits' device (a GPU's, on the CUDA path): only the sampled
ids and the requested logprobs come back to the host. A seeded request's noise is
drawn on the CPU from its generator and sent over, so a seed gives the same tokens
on every device that computes the same logits.
"""

from __future__ import annotations

import torch

from inferd.engine.core.guidance import apply_masks
from inferd.engine.core.request import Request
from inferd.engine.messages import PositionLogprobs


def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[PositionLogprobs | None]]:
    """logits: [R, V] for R requests; returns one token and optional logprobs per row."""
    logits = logits.float()
    want_lp = [r.params.logprobs is not None for r in reqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

    logits = _apply_penalties(logits, reqs)
    logits = _apply_logit_bias(logits, reqs)
    logits = apply_masks(logits, [r.matcher for r in reqs])
    logits = _mask_early_stops(logits, reqs)

    dev = logits.device
    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    if len(greedy) == len(reqs):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.empty(len(reqs), dtype=torch.long, device=dev)
        if greedy:
            rows = torch.tensor(greedy, device=dev)
            tokens[rows] = logits[rows].argmax(dim=-1)
        rest = [i for i, r in enumerate(reqs) if not r.params.greedy]
        rows = torch.tensor(rest, device=dev)
        tokens[rows] = _sample_random(logits[rows], [reqs[i] for i in rest])

    token_list = tokens.tolist()  # the step's one wait for the device
    logprobs: list[PositionLogprobs | None] = [None] * len(reqs)
    for i, r in enumerate(reqs):
        if want_lp[i]:
            logprobs[i] = position_logprobs(raw_logprobs[i], token_list[i], r.params.logprobs)
    return token_list, logprobs


def position_logprobs(row_logprobs: torch.Tensor, token: int, top_n: int) -> PositionLogprobs:
    """The actual token's logprob and rank (1 = most likely), then the top-N."""
    lp = row_logprobs[token]
    rank = int((row_logprobs > lp).sum()) + 1
    ids, lps, ranks = [token], [float(lp)], [rank]
    if top_n:
        top_lp, top_ids = row_logprobs.topk(top_n)
        ids += top_ids.tolist()
        lps += top_lp.tolist()
        ranks += list(range(1, top_n + 1))
    return PositionLogprobs(ids, lps, ranks)


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(reqs)
            if r.params.repetition_penalty != 1.0 or r.params.frequency_penalty
            or r.params.presence_penalty]
    if not rows:
        return logits
    vocab, dev = logits.shape[-1], logits.device
    for i in rows:
        p = reqs[i].params
        out_ids = torch.tensor(reqs[i].output_token_ids, dtype=torch.long, device=dev)
        counts = torch.zeros(vocab, device=dev).index_add_(0, out_ids, torch.ones(len(out_ids), device=dev))
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(reqs[i].prompt_token_ids, dtype=torch.long, device=dev)] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(seen, penalized, row)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        logits[i] = row
    return logits


def _apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    for i, r in enumerate(reqs):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), dtype=torch.long, device=logits.device)
            logits[i, ids] += torch.tensor(list(r.params.logit_bias.values()), dtype=logits.dtype,
                                           device=logits.device)
    return logits


def _mask_early_stops(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    for i, r in enumerate(reqs):
        if r.num_output_tokens < r.params.min_tokens:
            stop_ids = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                stop_ids |= r.eos_token_ids
            ids = [t for t in stop_ids if t < logits.shape[-1]]
            if ids and (r.matcher is None or int(torch.isfinite(logits[i]).sum()) > len(ids)):
                logits[i, ids] = float("-inf")
    return logits


def _sample_random(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    vocab, dev = logits.shape[-1], logits.device
    temp = torch.tensor([r.params.temperature for r in reqs], device=dev).unsqueeze(1)
    logits = logits / temp
    top_k = [r.params.top_k for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([r.params.min_p for r in reqs], device=dev).unsqueeze(1)
    if (min_p > 0).any():
        probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
    if unseeded:
        noise[torch.tensor(unseeded, device=dev)] = torch.empty(len(unseeded), vocab, device=dev).exponential_()
    for i, r in enumerate(reqs):
        if r.generator is not None:
            r.generator.manual_seed(position_seed(r.params.seed, r.num_output_tokens))
            noise[i] = torch.empty(vocab).exponential_(generator=r.generator).to(dev)
    return (probs / noise).argmax(dim=-1)


def position_seed(seed: int, position: int) -> int:
    """A generator seed for one output position of a seeded request (splitmix64 of both), so that
    neighbouring seeds (the n samples of a request use seed + i) never share a position's noise."""
    x = (seed * 0x9E3779B97F4A7C15 + position) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab, dev = logits.shape[-1], logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev).unsqueeze(1)
    positions = torch.arange(vocab, device=dev).unsqueeze(0)
    drop = positions >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p, device=dev).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
