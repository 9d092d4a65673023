"""What a weight loader hands to the rest of the engine.

Every source format (a Hugging Face directory, a GGUF file, the conversion cache)
is turned into one `Checkpoint`: an HF-style model config, HF-named tensors, and
a `TokenizerSpec`. Model code only ever sees this shape, so adding a format means
writing one loader and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TokenizerSpec:
    """Everything needed to build a tokenizer and its chat template.

    `tokenizer_json` is a `tokenizers` JSON serialization; the special tokens are
    given as strings (as Hugging Face's tokenizer_config.json does) and
    `eos_token_ids` lists every id that ends generation (config and
    generation_config can name several).
    """

    tokenizer_json: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class Checkpoint:
    """A loaded model: HF-style `config` dict, HF-named float tensors, tokenizer."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: TokenizerSpec
    source: str = ""
