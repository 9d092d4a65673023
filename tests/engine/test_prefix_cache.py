"""Prefix caching: block-manager invariants under random operations, and identical
outputs with the cache on and off under everything the scheduler does."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from inferd import LLM, SamplingParams
from inferd.engine.core.kv_cache import KVCacheManager, block_hash
from inferd.engine.core.request import Request

BLOCK = 4


def _chain(tokens: tuple[int, ...]) -> bytes:
    h = None
    for i in range(0, len(tokens), BLOCK):
        h = block_hash(h, tokens[i:i + BLOCK])
    return h


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives KVCacheManager the way the scheduler does and checks it after every step.

    Prompts come from a tiny alphabet, so prefixes are often shared; `content` records
    which token prefix each block really holds, as written by a 'model step'."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BLOCK)
        self.live: dict[str, Request] = {}
        self.content: dict[int, tuple[int, ...]] = {}
        self.next_id = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def admit(self, prompt):
        req = Request(str(self.next_id), prompt, SamplingParams())
        self.next_id += 1
        req.num_computed_tokens = self.kv.attach_cached_prefix(req)
        for i, b in enumerate(req.block_ids):  # a hit block holds exactly this prefix
            assert self.content[b] == tuple(req.token_ids[:(i + 1) * BLOCK])
        if self.kv.allocate(req, req.num_tokens - req.num_computed_tokens):
            self.live[req.request_id] = req
            self._compute(req, req.num_tokens - req.num_computed_tokens)
        else:
            self.kv.free(req)

    def _compute(self, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        for pos in range(start, start + n):
            b = req.block_ids[pos // BLOCK]
            if self.kv.ref_count[b] == 1:  # only an unshared block is ever written
                self.content[b] = tuple(req.token_ids[:pos + 1])
        req.num_computed_tokens += n
        self.kv.cache_full_blocks(req)

    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        if not self.live:
            return
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        req.token_ids.append(token)
        if self.kv.allocate(req, 1):
            self._compute(req, 1)
        else:
            req.token_ids.pop()

    @rule(data=st.data())
    def finish(self, data):
        if self.live:
            rid = data.draw(st.sampled_from(sorted(self.live)))
            self.kv.free(self.live.pop(rid))

    @rule()
    def reset(self):
        self.kv.reset_prefix_cache()

    @invariant()
    def reference_counts_match_block_tables(self):
        refs = [0] * self.kv.num_blocks
        for req in self.live.values():
            assert len(req.block_ids) == len(set(req.block_ids)), "a block owned twice by one request"
            assert len(req.block_ids) == -(-req.num_computed_tokens // BLOCK)
            for b in req.block_ids:
                refs[b] += 1
        assert refs == self.kv.ref_count
        assert min(self.kv.ref_count) >= 0

    @invariant()
    def no_block_leaks(self):
        free = set(self.kv._free)
        assert free == {b for b in range(self.kv.num_blocks) if self.kv.ref_count[b] == 0}
        assert self.kv.num_free_blocks == len(free)

    @invariant()
    def every_cached_hash_maps_to_the_tokens_it_claims(self):
        for h, b in self.kv.cached_blocks.items():
            assert self.kv.block_hash[b] == h
            assert len(self.content[b]) % BLOCK == 0 and _chain(self.content[b]) == h


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 3


def _runs(llm: LLM, prompts, params):
    # two waves: the second one finds the first one's blocks in the cache
    first = llm.generate(prompts[: len(prompts) // 2], params)
    second = llm.generate(prompts[len(prompts) // 2:], params)
    return first + second


@pytest.mark.parametrize("options", [
    dict(),                                                            # plain
    dict(max_num_batched_tokens=16),                                   # chunked prefill
    dict(block_size=4, kv_cache_bytes=48 * 2 * 2 * 4 * 2 * 16 * 4,     # forced preemption
         max_num_batched_tokens=32),
])
def test_outputs_are_identical_with_the_cache_on_and_off(tiny_llama, options):
    questions = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three.", "Why?", "Where?"]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True, n=2)]
    on = LLM(str(tiny_llama), dtype="float32", progress=False, **options)
    off = LLM(str(tiny_llama), dtype="float32", progress=False, enable_prefix_caching=False, **options)
    for p in params:
        prompts = [SYSTEM + q for q in questions]
        got = _runs(on, prompts, p)
        want = _runs(off, prompts, p)
        assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
        assert all(r.num_cached_tokens == 0 for r in want)
        assert any(r.num_cached_tokens > 0 for r in got[len(got) // 2:])
    assert on.engine.core.kv.num_free_blocks == on.engine.core.kv.num_blocks


def test_cached_tokens_are_whole_blocks_of_the_shared_prefix(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, block_size=16)
    ids = llm.tokenizer.encode(SYSTEM + "first")
    params = SamplingParams(temperature=0, max_tokens=4)
    [a] = llm.generate([ids], params)
    [b] = llm.generate([ids], params)
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == (len(ids) - 1) // 16 * 16 > 0
    assert b.outputs[0].token_ids == a.outputs[0].token_ids
    # prompt logprobs need every position computed: such a request skips the cache
    [c] = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert c.num_cached_tokens == 0 and len(c.prompt_logprobs) == len(ids)
