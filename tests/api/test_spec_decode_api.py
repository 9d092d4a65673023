"""Speculative decoding through the server (prompt lookup and a draft model): the CLI flags, the same greedy
answer, vLLM's metric names."""

from __future__ import annotations

import httpx
import pytest

from inferd.cli.main import build_parser, engine_config
from tests.api.conftest import MODEL, ServerProc

PROMPT = "one two three four five six seven eight one two three four five six seven eight one two three"


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def spec_server(request, tiny_llama, tiny_llama_draft):
    proposer = (["--speculative-method", "ngram"] if request.param == "ngram"
                else ["--speculative-model", str(tiny_llama_draft)])
    srv = ServerProc(tiny_llama, *proposer, "--num-speculative-tokens", "3",
                     "--speculative-config", '{"adaptive": false}', api_key=None).wait_ready()
    yield srv
    srv.stop()


def test_greedy_answer_and_metrics(server, spec_server):
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    plain = server.client().completions.create(**body)
    spec = spec_server.client().completions.create(**body)
    assert spec.choices[0].text == plain.choices[0].text
    m = spec_server.metrics()
    assert m["inferd:spec_decode_num_drafts_total"] > 0
    assert 0 < m["inferd:spec_decode_num_accepted_tokens_total"] <= m["inferd:spec_decode_num_draft_tokens_total"]
    text = httpx.get(spec_server.url + "/metrics", timeout=5).text
    assert 'inferd:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in text


def test_flags_fill_one_config_and_bad_ones_are_refused():
    parser = build_parser()
    args = parser.parse_args(["serve", "--speculative-method", "ngram", "--num-speculative-tokens", "6",
                              "--speculative-config", '{"prompt_lookup_max": 3}'])
    spec = engine_config(args, None).speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max) == ("ngram", 6, 3)
    assert engine_config(parser.parse_args(["serve"]), None).speculative_config is None
    draft = engine_config(parser.parse_args(["serve", "--speculative-model", "/d", "--num-speculative-tokens", "5",
                                             "--speculative-config", '{"quantization": "int4"}']),
                          None).speculative_config
    assert (draft.method, draft.model, draft.quantization, draft.num_speculative_tokens) == (
        "draft_model", "/d", "int4", 5)
    for argv, message in ((["--num-speculative-tokens", "4"], "needs --speculative-method"),
                          (["--speculative-config", '{"method": "eagle"}'], "not supported"),
                          (["--speculative-method", "ngram", "--speculative-model", "/d"],
                           "only for method draft_model"),
                          (["--speculative-method", "ngram", "--num-speculative-tokens", "0"],
                           "num_speculative_tokens")):
        with pytest.raises(ValueError, match=message):
            engine_config(parser.parse_args(["serve", *argv]), None)
