"""Sampling parameters: each one has a test that fails when it is broken."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, InvalidParameterError, SamplingParams
from inferd.engine.core.request import Request
from inferd.engine.core.sampler import sample
from tests.engine.helpers import stream

VOCAB = 10


def _req(params: SamplingParams, prompt=(1, 2), outputs=(), eos=(0,)) -> Request:
    r = Request("r", list(prompt), params, frozenset(eos))
    r.token_ids.extend(outputs)
    return r


def _logits(favourite: int, runner_up: int) -> torch.Tensor:
    row = torch.zeros(VOCAB)
    row[favourite], row[runner_up] = 5.0, 4.0
    return row.unsqueeze(0)


def test_greedy_picks_the_argmax():
    assert sample(_logits(3, 4), [_req(SamplingParams(temperature=0))])[0] == [3]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, repetition_penalty=2.0),
    SamplingParams(temperature=0, frequency_penalty=2.0),
    SamplingParams(temperature=0, presence_penalty=2.0),
])
def test_penalties_move_greedy_off_a_repeated_token(params):
    assert sample(_logits(3, 4), [_req(params, outputs=[3, 3])])[0] == [4]
    # without the repeat nothing changes
    assert sample(_logits(3, 4), [_req(params, outputs=[5])])[0] == [3]


def test_repetition_penalty_covers_the_prompt_too():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(_logits(3, 4), [_req(params, prompt=[3])])[0] == [4]


def test_frequency_penalty_grows_with_count_presence_does_not():
    freq = SamplingParams(temperature=0, frequency_penalty=0.6)
    pres = SamplingParams(temperature=0, presence_penalty=0.6)
    # margin 1.0: two repeats cost 1.2 under frequency, 0.6 under presence
    assert sample(_logits(3, 4), [_req(freq, outputs=[3, 3])])[0] == [4]
    assert sample(_logits(3, 4), [_req(pres, outputs=[3, 3])])[0] == [3]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])
    token = sample(_logits(0, 4), [_req(params, outputs=[7])])[0][0]
    assert token not in (0, 4)
    assert sample(_logits(0, 4), [_req(params, outputs=[7, 7])])[0] == [0]


def test_top_k_1_and_tiny_top_p_are_greedy_and_min_p_cuts_the_tail():
    logits = torch.tensor([[3.0, 2.9, 0, 0, 0, 0, 0, 0, 0, 0]])
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=0.01)):
        assert {sample(logits, [_req(params)])[0][0] for _ in range(30)} == {0}
    mp = SamplingParams(temperature=1.0, min_p=0.5)
    assert {sample(logits, [_req(mp)])[0][0] for _ in range(60)} == {0, 1}
    top_p = SamplingParams(temperature=1.0, top_p=0.6)
    assert {sample(logits, [_req(top_p)])[0][0] for _ in range(60)} == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * 7]))
    counts = torch.zeros(VOCAB)
    # a seeded request's noise is fixed by (seed, output position): vary the seed
    for seed in range(2000):
        counts[sample(logits.clone(), [_req(SamplingParams(temperature=1.0, seed=seed))])[0][0]] += 1
    assert counts[:3].div(2000).sub(torch.tensor([0.7, 0.2, 0.1])).abs().max() < 0.04


def test_logprobs_report_the_chosen_token_rank_and_top_n():
    logits = _logits(3, 4)
    tokens, lps = sample(logits, [_req(SamplingParams(temperature=0, logprobs=2))])
    lp = lps[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_ids == [3, 3, 4] and lp.ranks == [1, 1, 2]
    assert lp.logprobs[0] == pytest.approx(expected[3].item())


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False)


def test_stop_string_cuts_the_text_and_never_leaks_in_the_stream(llm):
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate(["The quick brown fox"], base)[0].outputs[0].text
    stop = full[10:14]
    assert stop and full.find(stop) == 10, full
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    [(deltas, out)] = stream(llm, ["The quick brown fox"], params)
    o = out.outputs[0]
    assert o.text == full[:10]
    assert (o.finish_reason, o.stop_reason) == ("stop", stop)
    assert "".join(d[0] for d in deltas) == full[:10]
    kept = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                          include_stop_str_in_output=True)
    assert llm.generate(["The quick brown fox"], kept)[0].outputs[0].text == full[:14]
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_stop_token_ids_eos_and_ignore_eos(llm):
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tokens = llm.generate(["def main():"], base)[0].outputs[0].token_ids
    stop_id = tokens[5]
    first = tokens.index(stop_id)
    out = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == tokens[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    # treat that same token as EOS: generation stops there unless ignore_eos
    core = llm.engine.core
    saved = core.eos_token_ids
    core.eos_token_ids = frozenset([stop_id])
    try:
        stopped = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
        ignored = llm.generate(["def main():"], base)[0].outputs[0]
        late = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=20,
                                                            min_tokens=first + 3))[0].outputs[0]
    finally:
        core.eos_token_ids = saved
    assert stopped.token_ids == tokens[:first + 1] and stopped.finish_reason == "stop"
    assert len(ignored.token_ids) == 20 and ignored.finish_reason == "length"
    assert len(late.token_ids) >= first + 3


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(top_k=-5), "top_k"),
    (dict(n=0), "n"),
    (dict(min_p=2), "min_p"),
    (dict(logprobs=50), "logprobs"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_bad_parameters_name_themselves(kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_bad_requests_are_refused_and_leave_the_engine_working(llm):
    too_long = list(range(3, 300)) * 2
    with pytest.raises(InvalidParameterError, match="maximum context length") as e:
        llm.generate([too_long], SamplingParams(max_tokens=4))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        llm.generate([[5, 10**6]], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidParameterError, match="at least one token"):
        llm.generate([[]], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished
    assert len(llm.generate(["ok"], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


def test_unknown_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/nonexistent/model", progress=False)
