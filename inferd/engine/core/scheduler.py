"""Continuous-batching scheduler under a token budget, with request priorities.

Each step it decides, for every request it runs, how many new tokens to compute
(`SchedulerOutput.num_new_tokens`): running requests first, in admission order, then
waiting ones while the token budget, the running-request limit and the KV pool
allow. A long prompt is simply given a chunk of the budget (chunked prefill).
When the pool runs out of blocks, the newest running request is preempted: its
blocks are freed, `num_computed_tokens` goes back to 0 and it waits at the head of
the queue to be recomputed. Nothing accepted is dropped.

Priorities (vLLM's convention: `Request.priority`, default 0, lower is sooner; the
Batch API runs its lines at 10). `WaitingQueue` keeps one FIFO per priority level
and serves the best level first; `running` stays ordered by (priority, admission),
so "the newest running request" (`running[-1]`) is the newest of the worst level.
A step walks both in priority order: the running requests of a level, then the
waiting ones of that level, then the next level; so better work gets the token
budget first. A waiting request that does not fit (the running limit is reached,
or the pool is short) preempts running requests of strictly worse priority, worst
and newest first, which are recomputed later like any preempted request. With equal
priorities this is exactly the FIFO behaviour above, and the hot path adds a few
comparisons per request, no sorting.

Speculative decoding (engine/spec_decode/) adds a request's draft tokens to a step
after scheduling, through `add_draft_tokens` (or, for a draft model, which needs the
blocks before it writes its KV there, `reserve_draft_tokens` then `set_draft_tokens`):
within the budget left and the blocks free, never preempting anyone for them. They
are ordinary new tokens of the step. With `draft_tokens` set, the budget for a running
request's drafts (up to half the step) is held back from the waiting prompts (it stays in
`budget_left`), so a queue of prompts does not crowd the drafts out of every step.

`update()` applies the model step's results: advance `num_computed_tokens` (by the
tokens that stand: rejected drafts are not computed, and the blocks that held only
them are released), append sampled tokens and decide token-level finishes (EOS,
stop token ids, max_tokens, context length). Stop *strings* are decided after
detokenization, outside the core, which then aborts the request.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from inferd.engine.core.kv_cache import KVCacheManager
from inferd.engine.core.request import Request, RequestStatus
from inferd.engine.messages import EngineCoreOutput, PositionLogprobs


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    draft_tokens: int = 0   # budget held back per running request for its drafts (speculative decoding)


@dataclass
class SchedulerOutput:
    requests: list[Request]              # in flat-batch order
    num_new_tokens: dict[str, int]       # request_id -> tokens to compute this step
    preempted: list[str] = field(default_factory=list)
    budget_left: int = 0                 # of the step's token budget, after everything scheduled


@dataclass
class StepResult:
    """Model-step results for the requests that reached the end of their tokens: the tokens each adds
    (one, or with drafts the accepted ones and one more), with logprobs per token where asked."""

    sampled: dict[str, list[int]]
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    num_drafts: dict[str, int] = field(default_factory=dict)  # drafts verified per request
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


class WaitingQueue:
    """Waiting requests: a FIFO per priority level, best (lowest) level served first.

    Levels are few (0 and 10 in practice) and only non-empty ones are kept, so
    `_levels` is a short sorted list and every operation is O(1) apart from
    `remove` (an abort), which scans one level.
    Iteration yields requests in the order they would be admitted.
    """

    def __init__(self):
        self._queues: dict[int, deque[Request]] = {}
        self._levels: list[int] = []  # priorities with a non-empty queue, ascending
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Request]:
        for level in self._levels:
            yield from self._queues[level]

    def __getitem__(self, index: int) -> Request:
        if index == 0 and self._len:
            return self.peek()
        return list(self)[index]

    def _queue(self, priority: int) -> deque[Request]:
        q = self._queues.get(priority)
        if q is None:
            q = self._queues[priority] = deque()
            bisect.insort(self._levels, priority)
        return q

    def _drop_level(self, priority: int) -> None:
        del self._queues[priority]
        self._levels.remove(priority)

    def append(self, req: Request) -> None:
        """Queue a new request behind the others of its priority."""
        self._queue(req.priority).append(req)
        self._len += 1

    def appendleft(self, req: Request) -> None:
        """Queue a preempted request ahead of the others of its priority."""
        self._queue(req.priority).appendleft(req)
        self._len += 1

    def peek(self) -> Request:
        return self._queues[self._levels[0]][0]

    def popleft(self) -> Request:
        q = self._queues[self._levels[0]]
        req = q.popleft()
        if not q:
            self._drop_level(req.priority)
        self._len -= 1
        return req

    def remove(self, req: Request) -> bool:
        q = self._queues.get(req.priority)
        if not q:
            return False
        try:
            q.remove(req)
        except ValueError:
            return False
        if not q:
            self._drop_level(req.priority)
        self._len -= 1
        return True


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since start; exported as a metric

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        """Finish a request now and free its blocks; False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, "abort")
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        running, waiting, kv = self.running, self.waiting, self.kv
        scheduled: list[Request] = []
        num_new: dict[str, int] = {}
        preempted: list[str] = []
        held = 0  # the running requests' draft budget: not for waiting prompts

        # running[:i] are scheduled; when a waiting request is considered, running[i:]
        # are exactly the running requests of strictly worse priority than it
        i = 0
        while budget > 0:
            # the running requests no worse than the best waiting one (all of them, with
            # one level), then the waiting request at the head. A preemption below only
            # shortens this run: what it sends back to waiting is no better than the rest.
            stop = len(running)
            if waiting and stop and running[-1].priority > waiting.peek().priority:
                stop = bisect.bisect_right(running, waiting.peek().priority, key=_priority)
            while i < stop and budget > 0:
                req = running[i]
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                while not kv.allocate(req, n):
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                    stop = min(stop, len(running))
                    if victim is req:
                        break
                else:
                    scheduled.append(req)
                    num_new[req.request_id] = n
                    budget -= n
                    if n == req.num_tokens - req.num_computed_tokens:  # it can draft after these
                        # at most half the step, so prompts still get admitted while many draft
                        held = min(held + self.config.draft_tokens, self.config.max_num_batched_tokens // 2)
                    i += 1
                    continue
                return SchedulerOutput(scheduled, num_new, preempted, budget)  # req itself was preempted

            if not waiting or budget - held <= 0:
                break
            req = waiting.peek()
            can_preempt = i < len(running)  # someone of worse priority holds a slot and blocks
            if not can_preempt and preempted:
                break  # the pool is short this step; admitting more would thrash
            if len(running) >= self.config.max_num_seqs:
                if not can_preempt:
                    break
                preempted.append(self._preempt_worst())
                continue
            if req.num_computed_tokens == 0:
                req.num_computed_tokens = kv.attach_cached_prefix(req)
                if req.num_preemptions == 0:  # usage reports what the first admission found
                    req.num_cached_tokens = req.num_computed_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget - held)
            if not kv.allocate(req, n):
                kv.free(req)  # let go of any cached prefix while it waits (or retries)
                req.num_computed_tokens = 0
                if not can_preempt:
                    break
                preempted.append(self._preempt_worst())
                continue
            waiting.popleft()
            req.status = RequestStatus.RUNNING
            if running and running[-1].priority > req.priority:
                bisect.insort_right(running, req, key=_priority)  # keep (priority, admission) order
            else:
                running.append(req)  # the common case: one level
            i += 1
            scheduled.append(req)
            num_new[req.request_id] = n
            budget -= n
        return SchedulerOutput(scheduled, num_new, preempted, budget)

    def reserve_draft_tokens(self, out: SchedulerOutput, req: Request, num_drafts: int) -> int:
        """Take the budget and the blocks for up to num_drafts draft tokens after a scheduled request's
        tokens, before the drafts are known (a draft model writes its KV for them there first); returns
        how many fit. Only for a request whose scheduled tokens reach the end of its known ones; no one is
        preempted for drafts. `set_draft_tokens` then gives back what the drafts do not use."""
        n = out.num_new_tokens[req.request_id]
        d = min(num_drafts, out.budget_left)
        while d > 0 and not self.kv.allocate(req, n + d):
            d -= 1
        out.budget_left -= d
        return d

    def set_draft_tokens(self, out: SchedulerOutput, req: Request, drafts: list[int], reserved: int) -> None:
        """Add the request's drafts (at most `reserved`) to the step, returning the unused rest of the room."""
        out.budget_left += reserved - len(drafts)
        if drafts:
            req.spec_token_ids = drafts
            out.num_new_tokens[req.request_id] += len(drafts)
        self.kv.release_tail(req, req.num_computed_tokens + out.num_new_tokens[req.request_id])

    def add_draft_tokens(self, out: SchedulerOutput, req: Request, drafts: list[int]) -> int:
        """Add as many of a scheduled request's drafts as the budget and the free blocks allow; returns how many."""
        d = self.reserve_draft_tokens(out, req, len(drafts))
        self.set_draft_tokens(out, req, drafts[:d], d)
        return d

    def _preempt_worst(self) -> str:
        """Make room for a better-priority request: give up the worst, newest running one."""
        victim = self.running.pop()
        self._preempt(victim)
        return victim.request_id

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, result: StepResult) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for req in out.requests:
            if req.status is RequestStatus.FINISHED:
                continue  # aborted while the step ran
            rid = req.request_id
            num_drafts = len(req.spec_token_ids)
            req.spec_token_ids = []
            # first the known tokens' progress (their blocks can be registered now), then the accepted drafts'
            req.num_computed_tokens += out.num_new_tokens[rid] - num_drafts
            self.kv.cache_full_blocks(req)
            core_out = EngineCoreOutput(rid, [], num_prompt_tokens=req.num_prompt_tokens,
                                        num_cached_tokens=req.num_cached_tokens)
            plp = result.prompt_logprobs.get(rid)
            if plp:
                req.num_prompt_logprobs_done += len(plp)
                core_out.new_prompt_logprobs = plp
            tokens = result.sampled.get(rid)
            if tokens is not None:
                logprobs = result.logprobs.get(rid)
                for i, token in enumerate(tokens):
                    if not self._append_token(req, token, logprobs[i] if logprobs else None, core_out):
                        break
                if req.status is not RequestStatus.FINISHED and num_drafts:
                    # every token but the last sampled one is now in the cache; the blocks past
                    # them held only rejected drafts
                    req.num_computed_tokens += len(tokens) - 1
                    self.kv.cache_full_blocks(req)
                    self.kv.release_tail(req)
            if core_out.new_token_ids or core_out.new_prompt_logprobs or core_out.finished:
                outputs.append(core_out)
        return outputs

    def _append_token(self, req: Request, token: int, logprobs: PositionLogprobs | None,
                      core_out: EngineCoreOutput) -> bool:
        """Append one sampled token; False when the request finished (the token may or may not be kept)."""
        params = req.params
        max_tokens = params.max_tokens
        if max_tokens is not None and req.num_output_tokens >= max_tokens:
            self._finish(req, "length", core_out)  # max_tokens=0: prompt work only
            return False
        req.token_ids.append(token)
        core_out.new_token_ids.append(token)
        if logprobs is not None:
            if core_out.new_logprobs is None:
                core_out.new_logprobs = []
            core_out.new_logprobs.append(logprobs)
        if req.matcher is not None and token not in req.eos_token_ids:
            if not req.matcher.consume_token(token) or req.matcher.is_stopped():
                # the grammar is complete (nothing but EOS could follow), or, with the mask applied,
                # a state that cannot happen: either way this answer ends here
                self._finish(req, "stop" if not req.matcher.is_error() else "abort", core_out)
                return False
        n_out = req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                self._finish(req, "stop", core_out)
                return False
            if token in params.stop_token_ids:
                self._finish(req, "stop", core_out, stop_reason=token)
                return False
        if (max_tokens is not None and n_out >= max_tokens) or req.num_tokens >= self.config.max_model_len:
            self._finish(req, "length", core_out)
            return False
        return True

    def _finish(self, req: Request, reason: str, core_out: EngineCoreOutput | None = None,
                stop_reason: int | str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        if core_out is not None:
            core_out.finish_reason, core_out.stop_reason = reason, stop_reason
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)


def _priority(req: Request) -> int:
    return req.priority
