"""Request priority: lower is scheduled sooner, and preempts worse-priority work to get in.

The scheduler tests drive `Scheduler` without a model; the engine tests run the real
engine on the tiny Llama and check that preempted low-priority requests still
produce exactly the tokens they produce alone (recompute is correct, nothing lost).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from inferd import LLM, SamplingParams
from inferd.engine.core.kv_cache import KVCacheManager
from inferd.engine.core.request import Request
from inferd.engine.core.scheduler import Scheduler, SchedulerConfig, WaitingQueue
from inferd.engine.sampling_params import InvalidParameterError
from tests.engine.test_reference import PROMPTS
from tests.engine.test_scheduler import _run_step

BATCH, INTERACTIVE = 10, 0


def _sched(blocks=100, block_size=4, max_seqs=8, budget=64, prefix_caching=False):
    return Scheduler(SchedulerConfig(max_seqs, budget, 10_000),
                     KVCacheManager(blocks, block_size, prefix_caching))


def _add(s, rid, n_prompt, priority=0, max_tokens=100, first=1) -> Request:
    req = Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens),
                  priority=priority)
    s.add(req)
    return req


def _ids(reqs):
    return [r.request_id for r in reqs]


# -- the waiting queue --------------------------------------------------------------------

def test_waiting_queue_serves_the_best_level_first_fifo_within_a_level():
    q = WaitingQueue()
    reqs = {rid: Request(rid, [1], SamplingParams(), priority=p)
            for rid, p in [("a", 10), ("b", 0), ("c", 10), ("d", -5), ("e", 0)]}
    for r in reqs.values():
        q.append(r)
    q.appendleft(Request("pre", [1], SamplingParams(), priority=10))  # a preempted one: first of its level
    assert _ids(q) == ["d", "b", "e", "pre", "a", "c"]
    assert len(q) == 6 and q.peek().request_id == "d" and q[0].request_id == "d"
    assert q.remove(reqs["d"]) and not q.remove(reqs["d"])
    assert q.popleft().request_id == "b"
    assert q.remove(reqs["e"])
    assert _ids(q) == ["pre", "a", "c"] and q.peek().request_id == "pre"
    while q:
        q.popleft()
    assert len(q) == 0 and list(q) == []


# -- the scheduler, without a model -------------------------------------------------------

def test_waiting_requests_are_admitted_by_priority_then_arrival():
    s = _sched(max_seqs=1)
    _add(s, "running", 3, INTERACTIVE, max_tokens=2)
    _run_step(s)
    _add(s, "batch-1", 3, BATCH)
    _add(s, "batch-2", 3, BATCH)
    _add(s, "chat-1", 3, INTERACTIVE)
    _add(s, "chat-2", 3, INTERACTIVE)
    order = []
    for _ in range(1000):
        if not s.has_unfinished:
            break
        out = _run_step(s)
        order += [rid for rid in out.num_new_tokens if rid not in order]
        assert not out.preempted  # nothing running is worse than what waits
    assert order == ["running", "chat-1", "chat-2", "batch-1", "batch-2"]


def test_a_better_request_preempts_the_worst_newest_running_one_when_the_engine_is_full():
    s = _sched(max_seqs=3)
    _add(s, "batch-old", 3, BATCH)
    _add(s, "mid", 3, 5)
    _add(s, "batch-new", 3, BATCH)
    _run_step(s)
    assert _ids(s.running) == ["mid", "batch-old", "batch-new"]  # kept in (priority, admission) order
    _add(s, "chat", 3, INTERACTIVE)
    out = _run_step(s)
    assert out.preempted == ["batch-new"]
    assert out.num_new_tokens == {"chat": 3, "mid": 1, "batch-old": 1}
    assert _ids(out.requests) == ["chat", "mid", "batch-old"]  # better work gets the budget first
    victim = s.requests["batch-new"]
    assert victim.num_computed_tokens == 0 and victim.num_output_tokens == 1  # its token is kept
    assert s.waiting.peek() is victim


def test_a_better_request_preempts_worse_ones_until_the_pool_has_room():
    s = _sched(blocks=6, block_size=4)
    _add(s, "batch-a", 8, BATCH, max_tokens=4, first=100)
    _add(s, "batch-b", 7, BATCH, max_tokens=4, first=200)
    _add(s, "batch-c", 7, BATCH, max_tokens=4, first=300)
    _run_step(s)                          # 2 + 2 + 2 blocks: the pool is full
    assert s.kv.num_free_blocks == 0
    _add(s, "chat", 12, INTERACTIVE, max_tokens=4)  # needs 3 blocks
    out = _run_step(s)
    assert out.preempted == ["batch-c", "batch-b"]           # worst priority, newest first
    assert out.num_new_tokens == {"chat": 12, "batch-a": 1}  # batch-a takes the block left over
    assert _ids(s.running) == ["chat", "batch-a"] and _ids(s.waiting) == ["batch-b", "batch-c"]
    assert s.kv.num_free_blocks == 0
    for _ in range(100):                  # every one still finishes, with all its tokens
        _run_step(s)
        if not s.has_unfinished:
            break
    assert not s.has_unfinished and s.kv.num_free_blocks == 6


def test_a_worse_or_equal_request_never_preempts():
    s = _sched(max_seqs=2)
    _add(s, "chat-1", 3, INTERACTIVE)
    _add(s, "batch", 3, BATCH)
    _run_step(s)
    _add(s, "chat-2", 3, INTERACTIVE)     # equal to the best running, better than "batch"
    out = _run_step(s)
    assert out.preempted == ["batch"]
    _add(s, "chat-3", 3, INTERACTIVE)     # now only equals run: it waits (FIFO, as today)
    _add(s, "batch-2", 3, BATCH)
    for _ in range(3):
        out = _run_step(s)
        assert not out.preempted
        assert set(out.num_new_tokens) == {"chat-1", "chat-2"}


def test_a_preempted_request_is_not_readmitted_in_the_same_step():
    s = _sched(max_seqs=2, budget=64)
    _add(s, "batch-1", 3, BATCH)
    _add(s, "batch-2", 3, BATCH)
    _run_step(s)
    _add(s, "chat", 3, INTERACTIVE)
    out = _run_step(s)
    assert out.preempted == ["batch-2"] and "batch-2" not in out.num_new_tokens
    out = _run_step(s)
    assert set(out.num_new_tokens) == {"chat", "batch-1"}  # still full: it waits for a slot


def test_abort_of_a_waiting_request_of_any_level():
    s = _sched(max_seqs=1)
    _add(s, "run", 3)
    _run_step(s)
    _add(s, "b", 3, BATCH)
    _add(s, "c", 3, 3)
    assert s.abort("c") and s.abort("b")
    assert len(s.waiting) == 0 and not s.abort("b")
    s.abort("run")
    assert not s.has_unfinished and s.kv.num_free_blocks == s.kv.num_blocks


# -- the engine on the tiny Llama ---------------------------------------------------------

LONG = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False)


def _alone(llm, prompt, params):
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def test_an_interactive_request_gets_in_at_once_and_the_batch_loses_nothing(tiny_llama, llm):
    small = LLM(str(tiny_llama), dtype="float32", progress=False, max_num_seqs=2).engine
    small.add_request("batch-1", PROMPTS[0], LONG, priority=BATCH)
    small.add_request("batch-2", PROMPTS[1], LONG, priority=BATCH)
    tokens: dict[str, list[int]] = {"batch-1": [], "batch-2": [], "chat": []}

    def step():
        for out in small.step():
            tokens[out.request_id] += out.outputs[0].token_ids_delta

    for _ in range(5):
        step()
    assert len(tokens["batch-1"]) == len(tokens["batch-2"]) == 5
    small.add_request("chat", PROMPTS[2], SHORT, priority=INTERACTIVE)
    step()
    assert len(tokens["chat"]) == 1  # its first token, in the very next step
    sched = small.core.scheduler
    assert sched.num_preemptions == 1 and sched.requests["batch-2"].num_preemptions == 1
    while small.has_unfinished:
        step()
    assert tokens["chat"] == _alone(llm, PROMPTS[2], SHORT)
    assert tokens["batch-1"] == _alone(llm, PROMPTS[0], LONG)
    assert tokens["batch-2"] == _alone(llm, PROMPTS[1], LONG)  # recomputed, same greedy tokens
    assert small.core.kv.num_free_blocks == small.core.kv.num_blocks


def test_mixed_priorities_under_a_small_pool_give_the_same_tokens(tiny_llama, llm):
    prompts = [llm.tokenizer.encode((PROMPTS[i % len(PROMPTS)] + " ") * (1 + i % 4)) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block_size, kv heads, head_dim, fp32
    small = LLM(str(tiny_llama), dtype="float32", progress=False, block_size=4, max_num_seqs=6,
                kv_cache_bytes=48 * block_bytes, max_num_batched_tokens=32)
    priorities = [(BATCH, INTERACTIVE, 5)[i % 3] for i in range(16)]
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, priority=priorities)]
    assert small.engine.core.scheduler.num_preemptions > 0
    assert got == expected
    assert small.engine.core.kv.num_free_blocks == small.engine.core.kv.num_blocks


def test_priority_must_be_an_integer(llm):
    for bad in (1.5, "1", True):
        with pytest.raises(InvalidParameterError, match="priority"):
            llm.engine.add_request("bad", PROMPTS[0], SHORT, priority=bad)
    assert not llm.engine.has_unfinished
    with pytest.raises(ValueError, match="priority"):
        llm.generate(PROMPTS[:2], SHORT, priority=[0])


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_random_mixed_workload_keeps_the_invariants_and_finishes_everything(seed):
    rng = random.Random(seed)
    s = _sched(blocks=40, block_size=4, max_seqs=5, budget=24, prefix_caching=True)
    reqs, next_id, aborted = {}, 0, set()
    for step in range(3000):
        if step < 400 and rng.random() < 0.4:  # arrivals at three levels, prompts sharing prefixes
            rid = f"r{next_id}"
            next_id += 1
            reqs[rid] = _add(s, rid, rng.randint(1, 30), rng.choice([0, 5, 10]),
                             max_tokens=rng.randint(1, 40), first=rng.choice([1, 1, 50, 100]))
        if s.running and rng.random() < 0.02:
            victim = rng.choice(s.running).request_id
            s.abort(victim)
            aborted.add(victim)
        if not s.has_unfinished and step >= 400:
            break
        out = _run_step(s)
        prios = [r.priority for r in s.running]
        assert prios == sorted(prios) and len(s.running) <= 5
        assert sum(out.num_new_tokens.values()) <= 24
        if s.waiting and s.running and s.waiting.peek().priority < s.running[-1].priority:
            assert sum(out.num_new_tokens.values()) == 24  # only a spent budget keeps it out
        owned = Counter(b for r in s.running for b in r.block_ids)  # shared prefixes count twice
        assert all(s.kv.ref_count[b] == c for b, c in owned.items())
        assert sum(s.kv.ref_count) == sum(owned.values()) and all(not r.block_ids for r in s.waiting)
    assert not s.has_unfinished and next_id > 50
    for rid, req in reqs.items():  # every request not aborted got all its tokens
        if rid not in aborted:
            assert req.finish_reason == "length" and req.num_output_tokens == req.params.max_tokens
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert s.num_preemptions > 0
