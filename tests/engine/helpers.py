"""Test helpers: run the engine one step at a time and collect what it streams."""

from __future__ import annotations

from inferd import LLM, SamplingParams


def stream(llm: LLM, prompts, params: SamplingParams | list[SamplingParams]):
    """Drive the engine by hand; returns {request_id: (deltas, final RequestOutput)}."""
    engine = llm.engine
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ids = []
    for prompt, p in zip(prompts, params):
        rid = engine.next_request_id()
        engine.add_request(rid, prompt, p)
        ids.append(rid)
    deltas = {rid: [] for rid in ids}
    final = {}
    while engine.has_unfinished:
        for out in engine.step():
            deltas[out.request_id].append([o.text_delta for o in out.outputs])
            if out.finished:
                final[out.request_id] = out
    return [(deltas[rid], final[rid]) for rid in ids]
