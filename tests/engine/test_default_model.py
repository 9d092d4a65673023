"""The embedded SmolLM2-135M-Instruct against transformers' Llama on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from inferd import LLM, SamplingParams
from inferd.models.loader import load_checkpoint

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into German.",
    "What is 12 times 12?",
    "Name a famous physicist.",
    "¿Cómo estás hoy?",
    "Explain what a GPU is in one sentence.",
]


@pytest.fixture(scope="module")
def reference():
    ckpt = load_checkpoint(None, progress=False)
    config = transformers.AutoConfig.for_model(
        ckpt.config["model_type"], **{k: v for k, v in ckpt.config.items() if k != "model_type"})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(ckpt.tensors, strict=False)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", progress=False)


def test_chat_answers_are_sensible(llm):
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=30))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_greedy_chat_continuations_match_transformers(llm, reference):
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    with torch.inference_mode():
        for prompt, out in zip(prompts, outs):
            ids = torch.tensor([prompt])
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                          do_sample=False, eos_token_id=None, pad_token_id=2)
            assert out.outputs[0].token_ids == expected[0, len(prompt):].tolist()


def test_prefill_logits_match_transformers(llm, reference):
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    [out] = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
    with torch.inference_mode():
        lp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), -1)
    ours = torch.tensor([next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]])
    theirs = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
