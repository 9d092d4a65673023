"""Rebuilding a `tokenizers.Tokenizer` from a GGUF file's metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, scores, merges,
token types and special token ids under llama.cpp's `tokenizer.ggml.*` keys.
`build_tokenizer_spec` turns those into a `TokenizerSpec` whose JSON the engine
loads with `tokenizers`. Two vocabulary kinds are understood:

* "gpt2": byte-level BPE (SmolLM, Qwen, Llama 3). How text is split before
  the merges depends on `tokenizer.ggml.pre`, which names the original model's
  pre-tokenizer; we rebuild the same split as that model's tokenizer.json.
* "llama": SentencePiece-style BPE (Llama 2, Mistral): "\u2581" stands for a
  space, `<0xNN>` tokens give byte fallback, merges come from the scores.

Token type 3 (control) becomes a special added token, so it is matched whole
and skipped on decode; type 4 (user-defined) becomes a plain added token.
"""

from __future__ import annotations

import warnings
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .checkpoint import TokenizerSpec

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` value -> (split regex or None, kind). Names are
# llama.cpp's; "gpt2" kind means GPT-2's own regex inside ByteLevel.
_PRE_TOKENIZERS = {
    "default": (None, "gpt2"),
    "gpt-2": (None, "gpt2"),
    "smollm": (None, "digits"),
    "llama3": (_LLAMA3_SPLIT, "split"),
    "llama-v3": (_LLAMA3_SPLIT, "split"),
    "llama-bpe": (_LLAMA3_SPLIT, "split"),
    "smaug-bpe": (_LLAMA3_SPLIT, "split"),
    "qwen2": (_QWEN2_SPLIT, "split"),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, "split"),
}
# Llama 3's tokenizer.json (and llama.cpp for these) look a whole pre-token
# up in the vocabulary before applying merges.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}
# Qwen's tokenizer.json normalizes to NFC before splitting.
_NFC = {"qwen2", "deepseek-r1-qwen"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def build_tokenizer_spec(meta: dict[str, Any]) -> TokenizerSpec:
    """A `TokenizerSpec` from GGUF metadata (key -> decoded value)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens; cannot build a tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level(meta, tokens, types)
        default_bos = False
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens, types)
        default_bos = True  # llama.cpp adds BOS to SPM vocabularies unless told not to
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')"
        )
    _add_special(tok, tokens, types, special_types={CONTROL} if kind == "gpt2" else {CONTROL, UNKNOWN})

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    eos_ids: list[int] = []
    # EOT ends a chat turn and EOM a tool-call message (Llama 3.1); both stop generation.
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        idx = meta.get(f"tokenizer.ggml.{key}")
        if idx is not None and idx not in eos_ids:
            eos_ids.append(int(idx))
    return TokenizerSpec(
        tokenizer_json=tok.to_str(),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        eos_token_ids=eos_ids,
    )


def _byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    alphabet = bytes_to_unicode()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Ordinary tokens are stored in the byte alphabet; one that is not
        # gets respelled so BPE can reach it. Added tokens keep their text,
        # since they are matched in the raw input, not in BPE output.
        if ty not in (CONTROL, USER_DEFINED) and not set(t) <= letters:
            t = "".join(alphabet[b] for b in t.encode("utf-8"))
        vocab[t] = i
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        warnings.warn(
            f"unknown GGUF pre-tokenizer {pre!r}; using GPT-2's split, tokens may differ "
            "from the original model's",
            stacklevel=3,
        )
    split, how = _PRE_TOKENIZERS.get(pre, (None, "gpt2"))
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)
    )
    if how == "split":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif how == "digits":
        # SmolLM's tokenizer.json: every digit is its own pre-token.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _NFC:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = list(meta.get("tokenizer.ggml.scores") or [])
        if len(scores) != len(tokens):
            scores = [-float(i) for i in range(len(tokens))]  # no scores: earlier is better
        merges = _merges_from_scores(tokens, types, scores)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # "first": only the start of the text gets the "\u2581" prefix, not text
    # that follows a special token (transformers' non-legacy Llama behaviour).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """SentencePiece BPE merges a pair when the joined piece is in the
    vocabulary, best-scoring piece first; list every such split, by score."""
    mergeable = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (NORMAL, USER_DEFINED)}
    found = []
    for piece, idx in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                found.append((-scores[idx], idx, cut, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _add_special(tok: Tokenizer, tokens: list[str], types: list[int], special_types: set[int]) -> None:
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in special_types
    ]
    plain = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)
