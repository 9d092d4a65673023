"""Resolve a model argument to a `Checkpoint` and build the model from it.

`None` means the embedded default model; a directory is a Hugging Face model
directory; a file ending in .gguf is a GGUF file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from inferd.models import idefics3
from inferd.models.checkpoint import Checkpoint
from inferd.models.config import ModelConfig
from inferd.models.llama import LlamaForCausalLM
from inferd.models.siglip import VisionConfig, VisionEncoder


def load_checkpoint(model: str | os.PathLike | None, *, progress: bool = True) -> Checkpoint:
    if model is None:
        from inferd.models.default_model import default_model_path
        model = default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        from inferd.models.hf_loader import load_hf_dir
        return load_hf_dir(path, progress=progress)
    if path.is_file() and path.suffix == ".gguf":
        from inferd.models.gguf_loader import load_gguf
        return load_gguf(path, progress=progress)
    if path.exists():
        raise ValueError(f"model: {str(model)!r} is neither a model directory nor a .gguf file")
    raise FileNotFoundError(f"model: path {str(model)!r} does not exist "
                            "(give a Hugging Face model directory or a .gguf file)")


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> tuple[LlamaForCausalLM, ModelConfig]:
    """The decoder (of a vision-language checkpoint: its language model; see `build_vision_encoder`)."""
    config, tensors = ckpt.config, ckpt.tensors
    if idefics3.is_vision_language(config):
        config = idefics3.decoder_config(config)
        tensors = idefics3.split_tensors(tensors)[0]
        # tied when the checkpoint has no output head of its own
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    cfg = ModelConfig.from_hf(config)
    # allocated uninitialized in the target dtype; load_weights casts while it copies
    model = LlamaForCausalLM(cfg, dtype, device)
    model.load_weights(tensors)
    return model.eval(), cfg


def build_vision_encoder(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> VisionEncoder | None:
    """The vision encoder and connector of a vision-language checkpoint; None for a text model."""
    if not idefics3.is_vision_language(ckpt.config):
        return None
    encoder = VisionEncoder(VisionConfig.from_hf(ckpt.config), dtype, device)
    encoder.load_weights(idefics3.split_tensors(ckpt.tensors)[1])
    return encoder.eval()
