"""Scheduler and KV block accounting, driven without a model."""

from __future__ import annotations

from inferd.engine.core.kv_cache import KVCacheManager
from inferd.engine.core.request import Request
from inferd.engine.core.scheduler import Scheduler, SchedulerConfig, StepResult
from inferd.engine.sampling_params import SamplingParams


def _sched(blocks=100, block_size=4, max_seqs=8, budget=32, prefix_caching=True):
    return Scheduler(SchedulerConfig(max_seqs, budget, 10_000),
                     KVCacheManager(blocks, block_size, prefix_caching))


def _add(s, rid, n_prompt, max_tokens=100, first=1):
    s.add(Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens)))


def _run_step(s):
    out = s.schedule()
    sampled = {r.request_id: [7] for r in out.requests
               if r.num_computed_tokens + out.num_new_tokens[r.request_id] == r.num_tokens}
    s.update(out, StepResult(sampled))
    return out


def test_token_budget_chunks_long_prompts_and_runs_decodes_first():
    s = _sched(budget=32)
    _add(s, "a", 10)
    _add(s, "b", 50)
    out = _run_step(s)
    assert out.num_new_tokens == {"a": 10, "b": 22}          # b's prompt is chunked
    out = _run_step(s)
    assert out.num_new_tokens == {"a": 1, "b": 28}           # a decodes, b finishes its prompt
    assert s.requests["b"].num_output_tokens == 1
    out = _run_step(s)
    assert out.num_new_tokens == {"a": 1, "b": 1}


def test_running_limit_is_respected():
    s = _sched(max_seqs=2)
    for i in range(5):
        _add(s, str(i), 3)
    out = _run_step(s)
    assert [r.request_id for r in out.requests] == ["0", "1"]
    assert len(s.waiting) == 3


def test_newest_request_is_preempted_when_blocks_run_out_and_recomputed_later():
    s = _sched(blocks=4, block_size=4, budget=64, prefix_caching=False)
    _add(s, "old", 8)
    _add(s, "new", 8)
    _run_step(s)                       # both prompts fit: 4 blocks used, each has 9 tokens now
    assert s.kv.num_free_blocks == 0
    out = _run_step(s)                 # "old" needs a third block: "new" gives its blocks up
    assert out.preempted == ["new"]
    assert s.requests["new"].num_computed_tokens == 0 and s.waiting[0].request_id == "new"
    assert s.requests["new"].num_output_tokens == 1  # its sampled token is kept, not dropped
    s.abort("old")
    out = _run_step(s)
    assert out.num_new_tokens == {"new": 9}            # prompt + output recomputed in one go
    assert s.kv.num_free_blocks == 4 - 3


def test_blocks_match_tokens_and_all_return_on_finish():
    s = _sched(blocks=50, block_size=4)
    for i in range(4):
        _add(s, str(i), 5 + i, max_tokens=6)
    while s.has_unfinished:
        _run_step(s)
        for r in s.running:
            assert len(r.block_ids) == -(-r.num_computed_tokens // 4)
        owned = [b for r in s.running for b in r.block_ids]
        assert len(owned) == len(set(owned))
    assert s.kv.num_free_blocks == 50


def test_a_preempted_request_recomputes_only_what_was_evicted():
    s = _sched(blocks=4, block_size=4, budget=64)
    _add(s, "old", 8)
    _add(s, "new", 8, first=100)
    _run_step(s)
    out = _run_step(s)                 # "old" takes one of "new"'s freed blocks: its tail
    assert out.preempted == ["new"]
    s.abort("old")
    out = _run_step(s)
    assert s.requests["new"].num_computed_tokens == 9
    assert out.num_new_tokens == {"new": 5}            # the first block came from the cache


def test_shared_prefix_is_computed_once_and_reported_as_cached():
    s = _sched(blocks=20, block_size=4, budget=64)
    _add(s, "a", 10)
    _run_step(s)
    _add(s, "b", 10)                   # same 10-token prompt: two full blocks are cached
    out = _run_step(s)
    assert out.num_new_tokens == {"a": 1, "b": 2}
    b = s.requests["b"]
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == s.requests["a"].block_ids[:2]
    assert s.kv.prefix_hits == 8 and s.kv.prefix_queries == 20


def _two_decoding_and_a_long_prompt(s):
    """Two requests past their prompts, then a 60-token prompt arrives: the next step's schedule."""
    _add(s, "a", 6)
    _add(s, "b", 6, first=20)
    _run_step(s)                                   # both prompts in one step: nothing runs yet to hold for
    _add(s, "long", 60, first=40)
    return s.schedule()


def test_running_requests_draft_budget_is_held_back_from_waiting_prompts():
    out = _two_decoding_and_a_long_prompt(
        Scheduler(SchedulerConfig(8, 32, 10_000, draft_tokens=4), KVCacheManager(100, 4, True)))
    # a and b decode (1 token each) and keep 4 draft tokens each; the prompt gets the rest
    assert out.num_new_tokens == {"a": 1, "b": 1, "long": 32 - 2 - 8}
    assert out.budget_left == 8
    # without drafts the prompt takes everything
    out = _two_decoding_and_a_long_prompt(_sched(budget=32))
    assert out.num_new_tokens["long"] == 30 and out.budget_left == 0
