"""Idefics3 (SmolVLM) checkpoints: a SigLIP encoder and connector beside a Llama decoder.

An Idefics3ForConditionalGeneration directory is split here into the two models the
engine runs: the decoder (`LlamaForCausalLM`, from `text_config` and the
`model.text_model.*` / `lm_head.*` tensors) and the vision encoder with its connector
(models/siglip.py, from `vision_config` and `model.vision_model.*` /
`model.connector.*`). The decoder never sees pixels: the engine puts the encoder's
output in place of the `<image>` tokens' embeddings (engine/core/model_runner.py).

`vision_spec` reads what the API side needs to turn an image into pixels and prompt
tokens (preprocessor_config.json, processor_config.json), as a `VisionSpec`.
"""

from __future__ import annotations

from typing import Any

import torch

from inferd.models.checkpoint import VisionSpec
from inferd.models.siglip import VisionConfig

ARCHITECTURES = ("Idefics3ForConditionalGeneration",)


def is_vision_language(config: dict[str, Any]) -> bool:
    return any(a in ARCHITECTURES for a in config.get("architectures") or ())


def decoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's HF config: `text_config`, as a Llama's."""
    text = dict(config["text_config"])
    text["architectures"] = ["LlamaForCausalLM"]
    return text


def split_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoder tensors named as a Llama's, vision tensors without the `model.` prefix)."""
    decoder, vision = {}, {}
    for name, value in tensors.items():
        short = name.removeprefix("model.")
        if short.startswith(("vision_model.", "connector.")):
            vision[short] = value
        elif short.startswith("text_model."):
            decoder["model." + short.removeprefix("text_model.")] = value
        else:
            decoder[name] = value  # lm_head.weight
    return decoder, vision


def vision_spec(config: dict[str, Any], preprocessor: dict[str, Any], processor: dict[str, Any]) -> VisionSpec:
    """What turns an image into tiles and prompt tokens, from the model's processor files."""
    per_tile = VisionConfig.from_hf(config).tokens_per_tile
    stated = processor.get("image_seq_len")
    if stated is not None and stated != per_tile:
        raise ValueError(f"processor_config.json: image_seq_len {stated} does not match the vision config, "
                         f"whose tiles make {per_tile} tokens each")
    tile = (preprocessor.get("max_image_size") or {}).get("longest_edge", 364)
    longest = (preprocessor.get("size") or {}).get("longest_edge", 4 * 364)
    resample = preprocessor.get("resample", 1)
    return VisionSpec(
        image_token_id=config["image_token_id"], tokens_per_tile=per_tile, tile_size=tile,
        longest_edge=longest, do_resize=preprocessor.get("do_resize", True),
        do_image_splitting=preprocessor.get("do_image_splitting", True), resample=resample,
        do_convert_rgb=preprocessor.get("do_convert_rgb", True),
        do_rescale=preprocessor.get("do_rescale", True),
        rescale_factor=preprocessor.get("rescale_factor", 1 / 255),
        do_normalize=preprocessor.get("do_normalize", True),
        image_mean=list(preprocessor.get("image_mean", [0.5, 0.5, 0.5])),
        image_std=list(preprocessor.get("image_std", [0.5, 0.5, 0.5])))
