"""Seeded tiny random-weight checkpoints, built with transformers, for reference tests.

Each is a real Hugging Face model directory (config.json, model.safetensors,
tokenizer.json with a byte-level BPE trained here, tokenizer_config.json with a
chat template), small enough to build and run in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching schedules many requests at once, 1234567890.",
    "Grüße aus Köln — ünïcödé, 日本語のテキスト, emoji 🙂🚀 and more.",
    "def main():\n    print('hello world')\n    return 0\n",
]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


# a template that thinks as Qwen3's does: the generation prompt opens <think>, or, with
# enable_thinking false, writes an empty thinking block so the model answers at once
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% else %}{{ '<think>\n' }}{% endif %}")


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, chat_template: str = CHAT_TEMPLATE,
                     **overrides) -> Path:
    """Write a tiny random `arch` (llama | qwen2 | qwen3) model directory to `path`."""
    import transformers

    tok = build_tokenizer(400)
    vocab = tok.get_vocab_size()
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # random init is small; widen it so logits are well spread
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "bias" in str(p):
                p.normal_(0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": chat_template}))
    return path


def build_noisy_copy(path: Path, source: Path, noise: float, seed: int = 0) -> Path:
    """`source` with Gaussian noise of std `noise` added to every matrix: a draft model that agrees with
    its target often but not always, with the target's tokenizer."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path, dirs_exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if t.dim() == 2:
            tensors[name] = t + noise * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
