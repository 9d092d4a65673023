"""Front-end half of the engine: token deltas from the core -> text outputs.

Tracks every request the user submitted: fans an `n > 1` request out into n core
requests (child i gets seed + i), detokenizes their tokens incrementally, applies
stop strings (returning the ids the core must abort), formats logprobs, and
assembles `RequestOutput`s whose per-sample `text_delta` is safe to stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.engine.client.detokenizer import IncrementalDetokenizer, StopStringMatcher
from inferd.engine.messages import EngineCoreOutput, PositionLogprobs
from inferd.engine.outputs import CompletionOutput, Logprob, PositionLogprobDict, RequestOutput
from inferd.engine.sampling_params import SamplingParams
from inferd.engine.tokenizer import Tokenizer


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"


@dataclass
class _Sample:
    parent: "_Parent"
    out: CompletionOutput
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    params: SamplingParams
    emitted: int = 0  # characters of detok.text released so far


class _Parent:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.output = RequestOutput(request_id, prompt, prompt_ids, [])
        self.params = params
        self.unfinished = params.n


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._samples: dict[str, _Sample] = {}
        self._parents: dict[str, _Parent] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                    params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """Register a request; returns the (core request id, params) pairs to submit."""
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        parent = _Parent(request_id, prompt, prompt_ids, params)
        self._parents[request_id] = parent
        children = []
        for i in range(params.n):
            child_params = params.for_child(i)
            if i > 0:
                child_params.prompt_logprobs = None  # one copy of the prompt's logprobs is enough
            out = CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
            parent.output.outputs.append(out)
            cid = child_request_id(request_id, i, params.n)
            self._samples[cid] = _Sample(
                parent, out, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                StopStringMatcher(params.stop, params.include_stop_str_in_output), child_params)
            children.append((cid, child_params))
        return children

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        if parent is None:
            return []
        return [child_request_id(request_id, i, parent.params.n) for i in range(parent.params.n)]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget a request (the caller aborts its children in the core)."""
        cids = self.child_ids(request_id)
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return None
        for cid in cids:
            sample = self._samples.pop(cid, None)
            if sample and not sample.out.finished:
                sample.out.finish_reason = "abort"
        parent.output.finished = True
        return parent.output

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply core outputs; returns updated request outputs and core ids to abort."""
        for s in self._samples.values():
            s.out.text_delta, s.out.token_ids_delta, s.out.logprobs_delta = "", [], []
        touched: dict[str, RequestOutput] = {}
        to_abort: list[str] = []
        for co in core_outputs:
            sample = self._samples.get(co.request_id)
            if sample is None:
                continue  # aborted by the user meanwhile
            parent = sample.parent
            if co.new_prompt_logprobs:
                self._add_prompt_logprobs(parent, co.new_prompt_logprobs)
            if sample.out.index == 0:  # the prompt is counted once, whatever n is
                parent.output.num_cached_tokens = co.num_cached_tokens
            if self._update_sample(sample, co):
                to_abort.append(co.request_id)
            if sample.out.finished:
                del self._samples[co.request_id]
                parent.unfinished -= 1
            rid = parent.output.request_id
            parent.output.finished = parent.unfinished == 0
            if parent.output.finished:
                self._parents.pop(rid, None)
            touched[rid] = parent.output
        return list(touched.values()), to_abort

    def _update_sample(self, s: _Sample, co: EngineCoreOutput) -> bool:
        """Returns True when a stop string ended the sample before the core did."""
        out = s.out
        out.token_ids.extend(co.new_token_ids)
        out.token_ids_delta = list(co.new_token_ids)
        if co.new_logprobs and out.logprobs is not None:
            converted = [self._convert(p) for p in co.new_logprobs]
            out.logprobs.extend(converted)
            out.logprobs_delta = converted
            out.cumulative_logprob += sum(p.logprobs[0] for p in co.new_logprobs)
        new_text = s.detok.add(co.new_token_ids, final=co.finished)
        text = s.detok.text
        stopped_here = False
        hit = s.stops.find(text, len(new_text))
        if hit is not None:
            cut, stop = hit
            text = text[:cut]
            out.finish_reason, out.stop_reason = "stop", stop
            stopped_here = not co.finished
        elif co.finished:
            out.finish_reason, out.stop_reason = co.finish_reason, co.stop_reason
        release = len(text) if out.finished else len(text) - s.stops.holdback(text)
        if release > s.emitted:
            out.text_delta = text[s.emitted:release]
            s.emitted = release
        out.text = text[:s.emitted]
        return stopped_here

    def _add_prompt_logprobs(self, parent: _Parent, plps: list[PositionLogprobs]) -> None:
        out = parent.output
        if out.prompt_logprobs is None:
            out.prompt_logprobs = [None]  # the first prompt token has no logprob
        out.prompt_logprobs.extend(self._convert(p) for p in plps)

    def _convert(self, p: PositionLogprobs) -> PositionLogprobDict:
        d: PositionLogprobDict = {}
        for tid, lp, rank in zip(p.token_ids, p.logprobs, p.ranks):
            if tid not in d:
                d[tid] = Logprob(lp, rank, self.tokenizer.decode([tid], skip_special_tokens=False))
        return d
