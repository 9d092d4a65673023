"""Speculative decoding: the same tokens as plain decoding, the target's distribution, blocks given back.

Most tests run with both proposers (the `spec` fixture): prompt lookup, and a draft model (the tiny Llama
with noise on its weights, so drafts are both kept and rejected)."""

from __future__ import annotations

import math

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.engine.core.kv_cache import KVCacheManager
from inferd.engine.core.request import Request
from inferd.engine.core.scheduler import Scheduler, SchedulerConfig, StepResult
from inferd.engine.spec_decode import verify
from inferd.engine.spec_decode.config import SpeculativeConfig
from inferd.engine.spec_decode.ngram import NgramIndex
from inferd.engine.spec_decode.policy import DraftCharge, StepCost, choose
from inferd.engine.structured import grammar_for
from tests.engine.test_reference import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
ALWAYS = {"num_speculative_tokens": 4, "adaptive": False}
PROPOSERS = ("ngram", "draft_model")
# the step budget these tests' counts (drafts verified, preemptions) were written against: a GPU's
# default; the CPU's 512 admits fewer prompts a step
BUDGET = {"max_num_batched_tokens": 2048}


def _always(proposer: str, draft_path) -> dict:
    """Speculation on every step, with prompt lookup or with the noisy tiny draft model."""
    if proposer == "ngram":
        return {**ALWAYS, "method": "ngram"}
    return {**ALWAYS, "method": "draft_model", "model": str(draft_path)}


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False, **BUDGET)


@pytest.fixture(scope="module", params=PROPOSERS)
def spec(request, tiny_llama, tiny_llama_draft):
    return LLM(str(tiny_llama), dtype="float32", progress=False, **BUDGET,
               speculative_config=_always(request.param, tiny_llama_draft))


def _prompts(llm, count):
    # repeated text, so prompt lookup finds drafts; a random model's greedy output also loops
    return [llm.tokenizer.encode((PROMPTS[i % len(PROMPTS)] + " ") * (2 + i % 3)) for i in range(count)]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _stats(llm):
    return llm.engine.core.speculator.stats


# -- the proposer, the rule, the policy ---------------------------------------------------

def test_ngram_proposes_what_followed_the_longest_suffix_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 4, 5, 1, 2, 3]
    assert index.propose(tokens, 4) == [4, 5, 1, 2]
    tokens += [4, 9]
    assert index.propose(tokens, 4) == []                 # 9 never occurred before
    tokens += [1, 2]
    assert index.propose(tokens, 4) == [3, 4, 9, 1]       # the latest occurrence of (1, 2)
    assert index.propose(tokens, 2) == [3, 4]
    assert NgramIndex(2, 3).propose([5, 1, 7, 1], 3) == []  # a match shorter than prompt_lookup_min


def test_a_draft_is_kept_up_to_the_first_token_that_differs():
    assert verify.accepted([4, 5, 6], [4, 5]) == [4, 5, 6]
    assert verify.accepted([4, 8, 6], [4, 5]) == [4, 8]
    assert verify.accepted([9, 5, 6], [4, 5]) == [9]


def test_the_policy_speculates_when_steps_are_flat_and_not_when_they_are_compute_bound():
    flat, bound = StepCost(), StepCost()
    for n in range(1, 100):
        flat.observe(n, 0.010)
        bound.observe(n, 0.001 * n)
    assert choose(1, 1, [(0.7, 4)], flat) == [4]
    assert choose(16, 16, [(0.5, 4)] * 16, bound) == [0] * 16
    # a request that rarely accepts gets fewer drafts than one that usually does
    few, many = choose(32, 32, [(0.2, 4), (0.9, 4)], _linear(0.010, 0.0002))
    assert few < many


def _linear(base, per_token):
    cost = StepCost()
    for n in range(1, 129):
        cost.observe(n, base + per_token * n)
    return cost


@pytest.mark.parametrize("bad, message", [
    ({"method": "eagle"}, "not supported"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"draft_model": "x"}, "unknown option"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_options_are_refused_naming_them(bad, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(bad)


@pytest.mark.parametrize("bad, message", [
    ({"method": "ngram", "model": "x"}, "only for method draft_model"),
    ({"method": "draft_model", "prompt_lookup_max": 3}, "only for method ngram"),
    ({"quantization": "int2"}, "not one of int8, int4"),
])
def test_options_of_the_other_proposer_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(bad)


def test_naming_a_draft_picks_the_draft_model_proposer():
    assert SpeculativeConfig.parse({"model": "/m"}).method == "draft_model"
    assert SpeculativeConfig.parse({"quantization": "int4"}).method == "draft_model"
    ngram = SpeculativeConfig.parse({})
    assert (ngram.method, ngram.prompt_lookup_max, ngram.prompt_lookup_min) == ("ngram", 4, 1)


def test_the_policy_charges_the_draft_models_forwards():
    flat = _linear(0.010, 0.0)

    def charge(per_forward, per_row=0.0, first_rows=(1,), once=(0.0,)):
        return DraftCharge(_linear(per_forward, per_row), list(first_rows), list(once))

    assert choose(1, 1, [(0.9, 4)], flat, charge(0.001)) == [4]  # a cheap draft: all four
    assert choose(1, 1, [(0.9, 4)], flat, charge(0.030)) == [0]  # dearer than a step: none
    # compute-bound steps: a draft row costs what it would save, on top of the draft's forwards
    assert choose(16, 16, [(0.9, 4)] * 16, _linear(0.001, 0.001), charge(0.0005, 0.0002, [1] * 16, [0.0] * 16)) \
        == [0] * 16
    # a draft that is rarely kept is not worth a forward, however cheap the target's extra rows
    assert choose(1, 1, [(0.1, 4)], flat, charge(0.002)) == [0]
    # a catch-up is paid: rows of the first forward, and a long one's share charged once
    assert choose(1, 1, [(0.9, 4)], flat, charge(0.001, 0.001, first_rows=[40])) == [0]
    assert choose(1, 1, [(0.9, 4)], flat, charge(0.001, once=[0.050])) == [0]


# -- greedy: identical to plain decoding --------------------------------------------------

def test_greedy_with_speculation_equals_without_alone_and_in_a_batch(plain, spec):
    prompts = _prompts(plain, 12)
    expected = _tokens(plain.generate(prompts, GREEDY))
    alone = [_tokens(spec.generate([p], GREEDY))[0] for p in prompts[:3]]
    before = _stats(spec).num_accepted_tokens
    batched = _tokens(spec.generate(prompts, GREEDY))
    assert alone == expected[:3]
    assert batched == expected
    assert _stats(spec).num_accepted_tokens > before  # drafts were accepted, not just tried
    kv = spec.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


def _small_pool(tiny_llama, config: dict) -> LLM:
    """64 blocks of 4 tokens and a 16-token step budget: preemption and chunked prefill all the time."""
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block_size, kv heads, head_dim, fp32
    if config.get("method") == "draft_model":
        block_bytes *= 2  # the draft's pool has as many blocks (the tiny drafts have the target's geometry)
    return LLM(str(tiny_llama), dtype="float32", progress=False, block_size=4,
               kv_cache_bytes=64 * block_bytes, max_num_batched_tokens=16, speculative_config=config)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_greedy_with_speculation_survives_preemption_chunking_and_the_prefix_cache(tiny_llama, tiny_llama_draft,
                                                                                   plain, proposer):
    prompts = _prompts(plain, 24)
    expected = _tokens(plain.generate(prompts, GREEDY))
    small = _small_pool(tiny_llama, _always(proposer, tiny_llama_draft))
    assert small.engine.core.kv.num_blocks == 64
    assert _tokens(small.generate(prompts, GREEDY)) == expected
    core = small.engine.core
    assert core.scheduler.num_preemptions > 0
    assert core.speculator.stats.num_accepted_tokens > 0
    hits = core.kv.prefix_hits
    assert _tokens(small.generate(prompts[-4:], GREEDY)) == expected[-4:]  # again, from the prefix cache
    assert core.kv.prefix_hits > hits
    assert core.kv.num_free_blocks == core.kv.num_blocks


# -- the draft model: its KV, its positions, its vocabulary ------------------------------

def test_a_self_draft_of_the_same_weights_is_almost_always_kept(tiny_llama, plain):
    # the draft is the target itself in fp32: its argmax is the target's greedy token unless its KV or
    # positions are wrong somewhere (after a rejection, a preemption, a chunked prompt, a cached prefix)
    prompts = _prompts(plain, 24)
    expected = _tokens(plain.generate(prompts, GREEDY))
    small = _small_pool(tiny_llama, {**ALWAYS, "method": "draft_model"})
    stats = small.engine.core.speculator.stats
    assert _tokens(small.generate(prompts, GREEDY)) == expected
    assert _tokens(small.generate(prompts[-4:], GREEDY)) == expected[-4:]  # from the prefix cache
    core = small.engine.core
    assert core.scheduler.num_preemptions > 0 and core.kv.prefix_hits > 0
    assert stats.num_draft_tokens > 300
    assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.97
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_a_self_draft_over_int8_kv_caches_is_kept_and_changes_no_token(tiny_llama):
    # both pools store int8 levels (--kv-cache-dtype int8); the same quantization on both sides, so the
    # draft still predicts the target, and the output is the int8 cache's own greedy output
    prompts = [[1, 2, 3, 4, 5, 6] * (2 + i) for i in range(6)]
    plain = LLM(str(tiny_llama), dtype="float32", progress=False, **BUDGET, kv_cache_dtype="int8")
    expected = _tokens(plain.generate(prompts, GREEDY))
    spec = LLM(str(tiny_llama), dtype="float32", progress=False, **BUDGET, kv_cache_dtype="int8",
               speculative_config={**ALWAYS, "method": "draft_model"})
    assert _tokens(spec.generate(prompts, GREEDY)) == expected
    stats = spec.engine.core.speculator.stats
    assert stats.num_draft_tokens > 100 and stats.num_accepted_tokens / stats.num_draft_tokens > 0.95


def test_drafts_are_the_draft_models_own_greedy_continuation(tiny_llama, tiny_llama_draft, plain, monkeypatch):
    # every draft, proposed from the draft's KV pool in a batch with rejections and preemptions, is what the
    # draft model computes from scratch on the request's tokens (and the drafts before it)
    small = _small_pool(tiny_llama, _always("draft_model", tiny_llama_draft))
    draft = small.engine.core.speculator.draft
    proposed = []
    propose = draft.propose

    def recording(reqs, lengths):
        drafts = propose(reqs, lengths)
        proposed.extend((list(r.token_ids), d) for r, d in zip(reqs, drafts))
        return drafts

    monkeypatch.setattr(draft, "propose", recording)
    prompts = _prompts(plain, 16)
    assert _tokens(small.generate(prompts, GREEDY)) == _tokens(plain.generate(prompts, GREEDY))
    stats = small.engine.core.speculator.stats
    assert small.engine.core.scheduler.num_preemptions > 0
    assert 0.2 < stats.num_accepted_tokens / stats.num_draft_tokens < 0.8
    for tokens, drafts in proposed[::7]:
        for i, t in enumerate(drafts):
            assert _last_logits(draft.model, draft.runner, tokens + drafts[:i]).argmax().item() == t


def _with_tokenizer_swap(source, path):
    """A copy of the tiny model whose tokenizer gives two tokens each other's ids."""
    import json
    import shutil

    shutil.copytree(source, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama, tmp_path):
    from tests.tiny_models import build_tiny_model

    bigger = build_tiny_model(tmp_path / "bigger", "llama", vocab_size=512)
    with pytest.raises(ValueError, match="vocabulary of 512 tokens"):
        LLM(str(tiny_llama), dtype="float32", progress=False, speculative_config={"model": str(bigger)})
    swapped = _with_tokenizer_swap(tiny_llama, tmp_path / "swapped")
    with pytest.raises(ValueError, match="another tokenizer than the target"):
        LLM(str(tiny_llama), dtype="float32", progress=False, speculative_config={"model": str(swapped)})
    with pytest.raises(ValueError, match="int4 needs the CPU and dtype bfloat16"):
        LLM(str(tiny_llama), dtype="float32", progress=False, speculative_config={"quantization": "int4"})


def test_stops_inside_accepted_drafts_end_the_request_where_plain_decoding_does(plain, spec):
    prompts = _prompts(plain, 6)
    free = _tokens(plain.generate(prompts, GREEDY))
    # stop at a token each output produces mid-way: it may be a draft accepted in the middle of a run
    for prompt, tokens in zip(prompts, free):
        params = SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[tokens[9]])
        [a], [b] = plain.generate([prompt], params), spec.generate([prompt], params)
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason == "stop"
    for n in (1, 2, 5):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        assert _tokens(spec.generate(prompts, params)) == [t[:n] for t in free]


def test_constrained_output_is_the_same_with_speculation(plain, spec):
    # a repetitive grammar, so drafts are proposed inside it and checked against it
    grammar = grammar_for("regex", "(ab|cd)+ (ab|cd)+ (ab|cd)+ (ab|cd)+ (ab|cd)+", "regex")
    prompts = [plain.tokenizer.encode("ab cd ab cd abab cdcd ab cd ")] + _prompts(plain, 3)
    params = SamplingParams(temperature=0, max_tokens=24, grammar=grammar)
    before = _stats(spec).num_draft_tokens
    assert _tokens(spec.generate(prompts, params)) == _tokens(plain.generate(prompts, params))
    assert _stats(spec).num_draft_tokens > before


def test_penalties_logprobs_and_min_tokens_see_the_drafts_before_each_position(plain, spec):
    prompts = _prompts(plain, 4)
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5,
                            presence_penalty=0.3, min_tokens=20, logprobs=2, logit_bias={5: 2.0})
    a, b = plain.generate(prompts, params), spec.generate(prompts, params)
    assert _tokens(b) == _tokens(a)
    for x, y in zip(a, b):
        assert len(y.outputs[0].logprobs) == len(y.outputs[0].token_ids)
        for pa, pb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert list(pa) == list(pb)
            assert [v.logprob for v in pa.values()] == pytest.approx([v.logprob for v in pb.values()], abs=1e-4)


def test_rejected_drafts_give_their_blocks_back():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=20))
    s.add(req)
    s.update(s.schedule(), StepResult({"r": [4]}))          # prefill: 3 computed, 4 tokens known
    out = s.schedule()
    assert s.add_draft_tokens(out, req, [5, 6, 7, 8, 9, 10])  # positions 3..9: 3 blocks
    assert len(req.block_ids) == 3
    s.update(out, StepResult({"r": [5, 1]}, num_drafts={"r": 6}))  # one accepted, then a correction
    assert req.token_ids == [1, 2, 3, 4, 5, 1]
    assert req.num_computed_tokens == 5 and len(req.block_ids) == 2
    assert kv.num_free_blocks == 14
    out = s.schedule()
    assert out.num_new_tokens["r"] == 1                        # only the correction is left to compute


# -- sampling: the target's distribution, and seeds --------------------------------------

def test_seeded_sampling_gives_the_same_tokens_with_speculation(plain, spec):
    prompts = _prompts(plain, 6)
    params = [SamplingParams(temperature=0.8, top_k=20, seed=s, max_tokens=24, ignore_eos=True) for s in range(6)]
    assert _tokens(spec.generate(prompts, params)) == _tokens(plain.generate(prompts, params))


def _exact_two_token_distribution(llm, prompt, top_k):
    """P(x1, x2) of the target model under top-k sampling, by teacher forcing."""
    model = llm.engine.core.model
    runner = llm.engine.core.runner

    def probs(ids):
        logits = _last_logits(model, runner, ids)
        top = logits.topk(top_k)
        p = torch.zeros_like(logits)
        p[top.indices] = torch.softmax(top.values, -1)
        return p

    p1 = probs(prompt)
    dist = {}
    for x1 in p1.nonzero().flatten().tolist():
        p2 = probs(prompt + [x1])
        for x2 in p2.nonzero().flatten().tolist():
            dist[(x1, x2)] = float(p1[x1] * p2[x2])
    return dist


def _last_logits(model, runner, ids):
    from inferd.layers.attention import AttentionMetadata

    n = len(ids)
    bs = runner.block_size
    caches = [torch.zeros_like(c[:, :-(-n // bs)]) for c in runner.kv_caches]  # scratch blocks
    meta = AttentionMetadata(torch.arange(n), [n], [n], torch.arange(-(-n // bs)).unsqueeze(0))
    runner.backend.prepare(meta, torch.device("cpu"))
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), caches, meta, runner.backend)
        return model.compute_logits(hidden[-1:]).float()[0]


def _chi_square_p_value(counts: dict, dist: dict, total: int) -> float:
    stat, cells = 0.0, 0
    other = total - sum(counts.get(k, 0) for k in dist)
    for k, p in dist.items():
        e = p * total
        stat += (counts.get(k, 0) - e) ** 2 / e
        cells += 1
    if other:
        return 0.0  # an outcome the target gives probability 0
    return _chi2_sf(stat, cells - 1)


def _chi2_sf(x: float, dof: int) -> float:
    """P(chi-square(dof) > x), by the Wilson-Hilferty approximation (good for dof >= 3)."""
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _sampled_pairs(llm, prompt, top_k, n):
    params = [SamplingParams(temperature=1.0, top_k=top_k, seed=1000 + i, max_tokens=2, ignore_eos=True)
              for i in range(n)]
    counts: dict = {}
    for out in llm.generate([prompt] * n, params):
        key = tuple(out.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _over_accepting(sampled, drafts):
    """A wrong rule: also keeps a draft the target did not sample, one time in three."""
    j = 0
    while j < len(drafts) and (sampled[j] == drafts[j] or torch.rand(()) < 1 / 3):
        j += 1
    return drafts[:j] + sampled[j:j + 1]


def _prompt_drafting_a_likely_token(llm, top_k):
    """A prompt whose draft t (by prompt lookup from [s, t, filler..., s], or the draft model's argmax) the
    target gives a probability in (0.2, 0.8) under top-k sampling, so drafts are both accepted and rejected."""
    core = llm.engine.core
    model, runner, draft = core.model, core.runner, core.speculator.draft
    filler = list(range(40, 52))
    for s in range(60, 120):
        t = 0
        for _ in range(4):  # t -> the likeliest token after the prompt built with t, until it settles
            prompt = [s, t] + filler + [s]
            drafted = t if draft is None else _last_logits(draft.model, draft.runner, prompt).argmax().item()
            top = _last_logits(model, runner, prompt).topk(top_k)
            p = dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))
            if 0.2 < p.get(drafted, 0) < 0.8:
                return prompt, drafted
            t = top.indices[0].item()
    raise AssertionError("no prompt drafts a likely token")


def test_sampled_output_with_speculation_follows_the_target_distribution(spec, monkeypatch):
    top_k, n = 3, 1500
    prompt, _ = _prompt_drafting_a_likely_token(spec, top_k)
    dist = _exact_two_token_distribution(spec, prompt, top_k)
    stats = _stats(spec)
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    counts = _sampled_pairs(spec, prompt, top_k, n)
    assert stats.num_draft_tokens - drafted >= n  # every request verified the draft...
    assert 0.1 * n < stats.num_accepted_tokens - accepted < 0.9 * n  # ...and it was often, not always, kept
    assert _chi_square_p_value(counts, dist, n) > 1e-3
    # the test has the power to see a wrong acceptance rule
    from inferd.engine.core import model_runner
    monkeypatch.setattr(model_runner, "accepted", _over_accepting)
    wrong = _sampled_pairs(spec, prompt, top_k, n)
    assert _chi_square_p_value(wrong, dist, n) < 1e-6
