"""Continuous batching: results do not depend on company, chunking or preemption."""

from __future__ import annotations

import pytest

from inferd import LLM, SamplingParams
from tests.engine.helpers import stream
from tests.engine.test_reference import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False)


def _prompts(llm, count):
    # varied lengths, some long enough to need several prefill chunks
    return [llm.tokenizer.encode((PROMPTS[i % len(PROMPTS)] + " ") * (1 + i % 5)) for i in range(count)]


def test_greedy_alone_equals_in_a_batch_of_32(llm):
    prompts = _prompts(llm, 32)
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts[:6]]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert batched[:6] == alone
    assert all(len(t) == 24 for t in batched)


def test_chunked_prefill_and_preemption_give_the_same_tokens(tiny_llama, llm):
    prompts = _prompts(llm, 32)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    # 64 blocks of 4 tokens cannot hold 32 requests of ~100 tokens: the scheduler must preempt
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block_size, kv heads, head_dim, fp32
    small = LLM(str(tiny_llama), dtype="float32", progress=False, block_size=4,
                kv_cache_bytes=64 * block_bytes, max_num_batched_tokens=16)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)]
    assert small.engine.core.scheduler.num_preemptions > 0
    assert got == expected
    assert small.engine.core.kv.num_free_blocks == small.engine.core.kv.num_blocks


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompts = _prompts(llm, 8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, [seeded] + [SamplingParams(temperature=1.0, max_tokens=30)] * 7)
    assert mixed[0].outputs[0].token_ids == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompts[0]], other)[0].outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    [out] = llm.generate(["The quick brown fox"], params)
    texts = [o.token_ids for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len(set(map(tuple, texts))) == 3
    [again] = llm.generate(["The quick brown fox"], params)
    assert [o.token_ids for o in again.outputs] == texts


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    kv = engine.core.kv
    engine.add_request("a", llm.tokenizer.encode(PROMPTS[6] * 3), SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    engine.step()
    assert kv.num_free_blocks < kv.num_blocks
    engine.abort_request("a")
    assert kv.num_free_blocks == kv.num_blocks
    assert not engine.has_unfinished


def test_streamed_deltas_concatenate_to_the_final_text(llm):
    # a random model emits stray byte tokens: every kind of partial character occurs here
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True)
    for deltas, final in stream(llm, PROMPTS, params):
        text = "".join(d[0] for d in deltas)
        assert text == final.outputs[0].text
        assert text == llm.tokenizer.decode(final.outputs[0].token_ids)
