"""Incremental detokenization and stop strings."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from inferd.engine.client.detokenizer import IncrementalDetokenizer, StopStringMatcher
from inferd.engine.tokenizer import Tokenizer
from inferd.models.checkpoint import TokenizerSpec
from tests.tiny_models import build_tokenizer

TEXTS = ["Grüße aus Köln — ünïcödé", "日本語のテキスト", "emoji 🙂🚀 and more", "plain ascii", "mixed 🙂 ü 日"]


def _byte_level():
    return Tokenizer(TokenizerSpec(tokenizer_json=build_tokenizer(400).to_str()))


def _byte_fallback():
    """A SentencePiece-style vocabulary: ▁ for spaces, <0xNN> tokens for everything unknown."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "e", "m", "o", "j", "i", "a", "n", "d", "r", "p", "l", "s", "c", "x", "G", "u", "K", "ö", "▁a"]:
        vocab.setdefault(piece, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(TokenizerSpec(tokenizer_json=tok.to_str()))


@pytest.mark.parametrize("make", [_byte_level, _byte_fallback])
@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_gives_exact_text_and_no_broken_characters(make, text):
    tok = make()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[])
    deltas = [detok.add([t], final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    if make is _byte_fallback and any(ord(c) > 127 for c in text):
        # multi-byte characters really were split over several byte tokens
        assert sum(1 for t in ids if 3 <= t < 259) >= 2


def test_first_token_keeps_its_leading_space_after_a_prompt():
    tok = _byte_level()
    prompt = tok.encode("The quick", add_special_tokens=False)
    out = tok.encode(" brown fox", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.add([t]) for t in out) + detok.add([], final=True)
    assert text == " brown fox"


def test_stop_matcher_finds_first_stop_and_holds_back_partials():
    m = StopStringMatcher(["END", "\n\n"])
    assert m.find("abc EN", 2) is None
    assert m.holdback("abc EN") == 2
    assert m.holdback("abc E") == 1
    assert m.holdback("abc x") == 0
    assert m.holdback("line\n") == 1
    assert m.find("abc END more", 12) == (4, "END")
    assert m.find("a\n\nb END", 8) == (1, "\n\n")
    assert StopStringMatcher(["END"], include_stop=True).find("abc END", 3) == (7, "END")
    # a stop string that ended before the new characters began was already handled
    assert m.find("END" + "x" * 10, 2) is None
