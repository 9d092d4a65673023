"""The default path for a quantized GGUF file: its own blocks (layers/quant_blocks.py).

A request's logits are the same bits alone, in a batch, and with its prompt cut into other
chunks (prompt and decode steps); the logits stay within a stated bound of transformers on the
dequantized weights; the options that ask for floats get floats.
"""

from __future__ import annotations

import os

import gguf
import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.layers import cpu_kernels
from tests.engine.test_default_model import QUESTIONS, reference  # noqa: F401 - the fixture
from tests.models.test_gguf import write_tiny_gguf

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3, prompt_logprobs=3)


@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels.load() is None:
        if os.environ.get("INFERD_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail("the CPU kernels did not build")
        pytest.skip("the GGUF-block path needs the CPU kernels")


@pytest.fixture(scope="module")
def llm(kernels):
    return LLM(progress=False)


def _numbers(out):
    """Everything a request's logits decide: prompt logprobs, tokens, their logprobs."""
    prompt = [sorted((k, v.logprob) for k, v in p.items()) for p in out.prompt_logprobs[1:]]
    steps = [sorted((k, v.logprob) for k, v in p.items()) for p in out.outputs[0].logprobs]
    return prompt, out.outputs[0].token_ids, steps


def test_the_default_model_runs_on_its_blocks(llm):
    core = llm.engine.core
    assert core.quantization == "gguf" and core.dtype == torch.float32
    assert core.model.layers[0].mlp.down_proj.packed.kind == "Q4_1"
    assert core.model.lm_head.packed.kind == "Q8_0"      # the tied Q8_0 embedding
    assert core.model.layers[0].mlp.down_proj.weight.numel() == 0  # no float copy kept


def test_logits_do_not_depend_on_the_batch_or_the_chunking(llm):
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = [_numbers(llm.generate([p], PARAMS)[0]) for p in prompts[:3]]
    batch = [_numbers(o) for o in llm.generate(prompts, PARAMS)]
    assert batch[:3] == alone
    # 16-token steps: every prompt is cut into chunks that share steps with other requests' decodes
    chunked = LLM(progress=False, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert [_numbers(o) for o in chunked.generate(prompts, PARAMS)][:3] == alone


def test_logits_stay_close_to_transformers_on_the_dequantized_weights(llm, reference):  # noqa: F811
    worst = 0.0
    for question in QUESTIONS[:4]:
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": question}])
        [out] = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
        with torch.inference_mode():
            lp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), -1)
        ours = torch.tensor([next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]])
        theirs = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        worst = max(worst, float((ours - theirs).abs().max()))
    # two int8 terms per activation: measured ~0.01 nats at most (one term, llama.cpp's: 0.52)
    assert worst < 0.05, worst


def test_floats_when_asked_for(kernels, tiny_llama, tmp_path):
    assert LLM(dtype="float32", progress=False).engine.core.quantization is None
    assert LLM(quantization="none", progress=False).engine.core.quantization is None
    assert LLM(str(tiny_llama), progress=False).engine.core.quantization is None  # a float model
    with pytest.raises(ValueError, match="gguf cannot be used: the model has no Q4_0"):
        LLM(str(tiny_llama), quantization="gguf", progress=False)


def test_a_mixed_file_packs_what_it_can_and_agrees_with_its_floats(kernels, tmp_path):
    # q/k/v Q4_0 (fused), o/gate Q4_1, up Q8_0 (gate_up mixed: stays in floats), down Q4_0, head Q8_0
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qk_type=gguf.GGMLQuantizationType.Q4_0)
    blocks = LLM(str(path), progress=False)
    model = blocks.engine.core.model
    assert blocks.engine.core.quantization == "gguf"
    assert model.layers[0].self_attn.qkv_proj.packed is not None
    assert model.layers[0].mlp.gate_up_proj.packed is None
    floats = LLM(str(path), quantization="none", dtype="float32", progress=False)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    ids = [5, 9, 11, 7, 6, 8, 10, 12]
    a = blocks.generate([ids], params)[0].prompt_logprobs[1:]
    b = floats.generate([ids], params)[0].prompt_logprobs[1:]
    diff = max(abs(next(iter(x.values())).logprob - next(iter(y.values())).logprob) for x, y in zip(a, b))
    assert diff < 0.01
