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
class VisionSpec:
    """How a vision-language model wants its images: the processor's settings (Idefics3's
    preprocessor_config.json) and the image token's id. Images are resized so that the longest edge
    is `longest_edge`, then to whole tiles of `tile_size` and split into them (plus the whole image
    at one tile, the global image), or, without splitting, resized to one tile; each tile is
    `tokens_per_tile` `<image>` tokens. `resample` is PIL's filter number (1: Lanczos)."""

    image_token_id: int
    tokens_per_tile: int
    tile_size: int
    longest_edge: int
    do_resize: bool = True
    do_image_splitting: bool = True
    resample: int = 1
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class QuantizedTensor:
    """A tensor as a GGUF file stores it in blocks: its raw bytes (rows of whole blocks, HF
    row order), ggml type name (Q4_1, ...) and HF shape."""

    data: torch.Tensor
    kind: str
    shape: list[int]


@dataclass
class Checkpoint:
    """A loaded model: HF-style `config` dict, HF-named float tensors, tokenizer; for a
    vision-language model, its `VisionSpec` too. `quantized` holds, for a GGUF file,
    the block-quantized tensors as stored (their float values are in `tensors` too), which
    a model can compute with directly (layers/quant_blocks.py)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: TokenizerSpec
    source: str = ""
    vision: VisionSpec | None = None
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
