"""Random prompts for the benchmarks: lengths, seeds, no shared prefixes."""

from __future__ import annotations

import pytest

from inferd.bench.datasets import random_lengths, random_text_prompts, random_token_prompts


def test_random_token_prompts_are_seeded_and_skip_excluded_ids():
    a = random_token_prompts(3, 20, vocab_size=50, seed=1, exclude={0, 1, 2})
    assert a == random_token_prompts(3, 20, vocab_size=50, seed=1, exclude={0, 1, 2})
    assert a != random_token_prompts(3, 20, vocab_size=50, seed=2, exclude={0, 1, 2})
    assert [len(p) for p in a] == [20, 20, 20]
    assert all(t not in (0, 1, 2) and t < 50 for p in a for t in p)
    assert [len(p) for p in random_token_prompts(2, [5, 7], 50, 0)] == [5, 7]


def test_random_lengths():
    lens = random_lengths(200, 100, 0.5, seed=0)
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 20
    assert random_lengths(3, 10, 0.0, seed=0) == [10, 10, 10]
    with pytest.raises(ValueError):
        random_lengths(3, 10, 1.0, seed=0)


def test_random_text_prompts_measured_with_a_tokenizer(tiny_llama):
    from inferd.engine.tokenizer import Tokenizer
    from inferd.models.loader import load_checkpoint

    tok = Tokenizer(load_checkpoint(tiny_llama, progress=False).tokenizer)
    prompts = random_text_prompts(8, 40, seed=5, tokenizer=tok)
    assert all(p.exact for p in prompts)
    assert all(abs(p.num_tokens - 40) <= 2 for p in prompts)
    assert all(p.num_tokens == len(tok.encode(p.text, add_special_tokens=False)) for p in prompts)
    assert len({p.text[:20] for p in prompts}) == 8                      # no shared prefixes
    assert [p.text for p in prompts] == [p.text for p in random_text_prompts(8, 40, 5, tok)]
    assert prompts[0].text != random_text_prompts(1, 40, 6, tok)[0].text  # new seed, new prompts


def test_random_text_prompts_estimated_without_a_tokenizer():
    p = random_text_prompts(2, 130, seed=0)
    assert not p[0].exact and p[0].num_tokens == 130 and len(p[0].text.split()) == 100
