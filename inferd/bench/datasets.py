"""Seeded random prompts for the benchmarks.

- `random_token_prompts`: lists of token ids drawn uniformly from the vocabulary
  (special tokens left out), for the offline benchmark, which feeds ids directly.
- `random_text_prompts`: text of random English words, for servers, which take
  text. With a tokenizer each prompt is cut to `input_len` tokens of it (the
  prompt the server's tokenizer sees may differ by a token or two at the cut);
  without one, the length is approximated at `TOKENS_PER_WORD` tokens a word.
  Each prompt draws its own words, so prompts share no prefix a server's prompt
  cache could reuse; a new seed gives new prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOKENS_PER_WORD = 1.3  # common English words in a Llama-family BPE, rough

_WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education foot boy age policy process music market sense nation plan
college interest death experience effect use class control care field development role effort
rate heart drug show leader light voice wife police mind price report decision son view
relationship town road arm difference value building action model season society tax director
position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window evidence
population truth song lake river garden stone bridge cloud winter summer autumn spring ocean
mountain forest valley desert island village market harbor castle engine signal battery circuit
planet orbit comet galaxy crystal copper silver marble velvet ribbon lantern compass anchor
quickly slowly quietly brightly gently rarely often always never maybe perhaps almost nearly
red blue green yellow purple orange golden silent ancient modern simple complex gentle brave
clever happy sad eager calm wild tiny huge bright dark early late warm cold soft loud sharp smooth
run walk jump read write speak listen build break carry follow create decide explain imagine
remember travel wonder answer borrow collect deliver discover gather measure notice observe
prepare protect question repair select share signal teach visit wander whisper
""".split()


def random_token_prompts(n: int, length: int | list[int], vocab_size: int, seed: int,
                         exclude: set[int] | frozenset[int] = frozenset()) -> list[list[int]]:
    """`n` prompts of random token ids (none in `exclude`); `length` is one length or one per prompt."""
    lengths = [length] * n if isinstance(length, int) else list(length)
    if len(lengths) != n:
        raise ValueError("length: need one length per prompt")
    allowed = [t for t in range(vocab_size) if t not in exclude]
    rng = random.Random(seed)
    return [rng.choices(allowed, k=max(1, k)) for k in lengths]


def random_lengths(n: int, mean: int, range_ratio: float, seed: int) -> list[int]:
    """`n` lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's random dataset)."""
    if not 0 <= range_ratio < 1:
        raise ValueError("range_ratio must be in [0, 1)")
    rng = random.Random(seed)
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


@dataclass
class TextPrompt:
    text: str
    num_tokens: int       # measured with the tokenizer, or estimated
    exact: bool           # True when measured


def random_text_prompts(n: int, input_len: int, seed: int, tokenizer=None) -> list[TextPrompt]:
    """`n` prompts of random words, each about `input_len` tokens long.

    `tokenizer`: an `inferd.engine.tokenizer.Tokenizer` (or anything with
    `encode(text, add_special_tokens=False)` and `decode(ids)`), used to cut each
    prompt to `input_len` tokens; without it the word count is estimated.
    """
    if input_len < 1:
        raise ValueError("input_len must be at least 1")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        if tokenizer is None:
            words = max(1, round(input_len / TOKENS_PER_WORD))
            text = " ".join(rng.choice(_WORDS) for _ in range(words))
            prompts.append(TextPrompt(text, round(words * TOKENS_PER_WORD), False))
            continue
        words = [rng.choice(_WORDS) for _ in range(input_len + 8)]  # >= 1 token a word: enough
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:input_len]
        text = tokenizer.decode(ids).strip()
        prompts.append(TextPrompt(text, len(tokenizer.encode(text, add_special_tokens=False)), True))
    return prompts
