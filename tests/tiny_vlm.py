"""A seeded tiny random-weight Idefics3 (SmolVLM) checkpoint, built with transformers, for reference tests.

A real Hugging Face directory as `save_pretrained` writes it (config.json with vision_config and
text_config, model.safetensors), plus what the processor needs: preprocessor_config.json (tile size,
longest edge, normalization), processor_config.json (image_seq_len), chat_template.json (SmolVLM's
template), and a tokenizer with the image tokens (`<image>`, `<fake_token_around_image>`,
`<global-img>`, `<row_i_col_j>`, `<end_of_utterance>`). The vision tower sees 16-pixel tiles in
4-pixel patches, so an image costs 4 tokens a tile and a large one a few dozen tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_models import build_tokenizer

IMAGE_TOKENS = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])

# SmolVLM-Instruct's chat template
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TILE = 16          # max_image_size.longest_edge: the vision encoder's input size
LONGEST_EDGE = 48  # size.longest_edge: images are resized to at most 3 x 3 tiles


def build_tiny_vlm(path: Path, seed: int = 0, do_image_splitting: bool = True) -> Path:
    import transformers
    from tokenizers import AddedToken

    tok = build_tokenizer(400)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    vocab = tok.get_vocab_size()
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TILE, patch_size=4, layer_norm_eps=1e-6)
    config = transformers.Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                                         image_token_id=tok.token_to_id("<image>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration(config)
    with torch.no_grad():  # random init is small; widen it so logits are well spread
        for name, p in model.named_parameters():
            if p.dim() == 2 and "position_embedding" not in name:
                p.normal_(0, 0.15)
            elif p.dim() == 4 or "position_embedding" in name:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "add_bos_token": False}))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"longest_edge": LONGEST_EDGE}, "resample": 1, "do_image_splitting": do_image_splitting,
        "max_image_size": {"longest_edge": TILE}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True}))
    (path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4, "processor_class": "Idefics3Processor"}))
    return path


def png(height: int, width: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A PNG file of seeded random pixels."""
    import io

    import numpy as np
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode).save(buf, "PNG")
    return buf.getvalue()


def reference_processor(path: Path):
    """transformers' own processor for the tiny model (PIL image processor, fast tokenizer)."""
    import transformers
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    config = json.loads((path / "preprocessor_config.json").read_text())
    config.pop("image_processor_type")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    image_seq_len = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
    return transformers.Idefics3Processor(Idefics3ImageProcessorPil(**config), tokenizer, image_seq_len=image_seq_len)
