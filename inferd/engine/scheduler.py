"""Continuous-batching scheduler under a token budget.

Each step it decides, for every request it runs, how many new tokens to compute
(`SchedulerOutput.num_new_tokens`): running requests first, in arrival order, then
waiting ones while the token budget, the running-request limit and the KV pool
allow. A long prompt is simply given a chunk of the budget (chunked prefill).
When the pool runs out of blocks, the newest running request is preempted: its
blocks are freed, `num_computed_tokens` goes back to 0 and it waits at the head of
the queue to be recomputed. Nothing accepted is dropped.

`update()` applies the model step's results: advance `num_computed_tokens`, append
sampled tokens and decide token-level finishes (EOS, stop token ids, max_tokens,
context length). Stop *strings* are decided after detokenization, outside the core,
which then aborts the request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from inferd.engine.kv_cache import KVCacheManager
from inferd.engine.request import PositionLogprobs, Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048


@dataclass
class SchedulerOutput:
    requests: list[Request]              # in flat-batch order
    num_new_tokens: dict[str, int]       # request_id -> tokens to compute this step
    preempted: list[str] = field(default_factory=list)


@dataclass
class EngineCoreOutput:
    """What one step produced for one request (deltas, not cumulative)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    new_prompt_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepResult:
    """Model-step results for the requests that reached the end of their tokens."""

    sampled: dict[str, int]
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
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
        scheduled: list[Request] = []
        num_new: dict[str, int] = {}
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(req)
                num_new[req.request_id] = n
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left to run

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if preempted:
                break  # the pool is short this step; admitting more would thrash
            req = self.waiting[0]
            if req.num_computed_tokens == 0:
                self.kv.attach_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req, n):
                self.kv.free(req)  # let go of any cached prefix while it waits
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(req)
            num_new[req.request_id] = n
            budget -= n
        return SchedulerOutput(scheduled, num_new, preempted)

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
            req.num_computed_tokens += out.num_new_tokens[req.request_id]
            self.kv.cache_full_blocks(req)
            core_out = EngineCoreOutput(req.request_id, [], num_prompt_tokens=req.num_prompt_tokens,
                                        num_cached_tokens=req.num_cached_tokens)
            plp = result.prompt_logprobs.get(req.request_id)
            if plp:
                req.num_prompt_logprobs_done += len(plp)
                core_out.new_prompt_logprobs = plp
            if req.request_id in result.sampled:
                self._append_token(req, result, core_out)
            if core_out.new_token_ids or core_out.new_prompt_logprobs or core_out.finished:
                outputs.append(core_out)
        return outputs

    def _append_token(self, req: Request, result: StepResult, core_out: EngineCoreOutput) -> None:
        params = req.params
        max_tokens = params.max_tokens
        if max_tokens is not None and req.num_output_tokens >= max_tokens:
            self._finish(req, "length", core_out)  # max_tokens=0: prompt work only
            return
        token = result.sampled[req.request_id]
        req.token_ids.append(token)
        core_out.new_token_ids.append(token)
        if req.request_id in result.logprobs:
            core_out.new_logprobs = [result.logprobs[req.request_id]]
        n_out = req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                return self._finish(req, "stop", core_out)
            if token in params.stop_token_ids:
                return self._finish(req, "stop", core_out, stop_reason=token)
        if (max_tokens is not None and n_out >= max_tokens) or req.num_tokens >= self.config.max_model_len:
            self._finish(req, "length", core_out)

    def _finish(self, req: Request, reason: str, core_out: EngineCoreOutput | None = None,
                stop_reason: int | str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        if core_out is not None:
            core_out.finish_reason, core_out.stop_reason = reason, stop_reason
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
