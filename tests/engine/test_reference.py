"""The engine against transformers on the same weights: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from inferd import LLM, SamplingParams
from inferd.layers.attention import AttentionMetadata, TorchAttentionBackend
from inferd.models.loader import build_model, load_checkpoint

PROMPTS = [
    "The quick brown fox",
    "Paged attention stores",
    "def main():",
    "Grüße aus Köln",
    "1234567890",
    "emoji 🙂🚀 and",
    "Continuous batching schedules many requests at once, 1234567890. The quick",
    "a",
]


def _stepwise_logits(model, ids: list[int], prefill: int, block_size: int = 4) -> torch.Tensor:
    """Prefill `prefill` tokens (in two chunks), then decode one token at a time through
    the paged cache; returns the logits at every position."""
    cfg = model.cfg
    n_blocks = -(-len(ids) // block_size) + 1
    caches = [torch.zeros(2, n_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
              for _ in range(cfg.num_layers)]
    # blocks in reverse order, so a wrong block-table lookup cannot pass by accident
    table = list(range(n_blocks - 1, -1, -1))
    backend = TorchAttentionBackend()
    half = prefill // 2
    chunks = [(0, half), (half, prefill)] + [(p, p + 1) for p in range(prefill, len(ids))]
    logits = []
    for start, end in chunks:
        pos = list(range(start, end))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([table[p // block_size] * block_size + p % block_size for p in pos]),
            query_lens=[end - start], seq_lens=[end], block_tables=torch.tensor([table]))
        backend.prepare(meta, torch.device("cpu"))
        with torch.inference_mode():
            h = model(torch.tensor(ids[start:end]), torch.tensor(pos), caches, meta, backend)
            logits.append(model.compute_logits(h))
    return torch.cat(logits)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_prefill_and_decode_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ckpt = load_checkpoint(path, progress=False)
    model, _ = build_model(ckpt, torch.float32, torch.device("cpu"))
    ids = torch.randint(3, ref.config.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = _stepwise_logits(model, ids, prefill=9)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_greedy_continuations_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(str(path), dtype="float32", progress=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        assert out.outputs[0].token_ids == expected.tolist(), out.prompt


def test_prompt_logprobs_match_transformers(tiny_llama):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, max_num_batched_tokens=8)
    ids = llm.tokenizer.encode(PROMPTS[6])
    [out] = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        actual = entry[ids[pos]]
        assert actual.logprob == pytest.approx(lp[pos - 1, ids[pos]].item(), abs=1e-4)
        top = lp[pos - 1].topk(2)
        for rank, (value, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert entry[tid].rank == rank
            assert entry[tid].logprob == pytest.approx(value, abs=1e-4)
        assert actual.rank == int((lp[pos - 1] > lp[pos - 1, ids[pos]]).sum()) + 1
