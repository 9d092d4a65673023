"""A seeded tiny random-weight BERT, built with transformers, for embedding reference tests.

A real Hugging Face model directory (config.json, model.safetensors, a WordPiece
tokenizer.json trained here with BERT's normalizer and [CLS] ... [SEP] template),
optionally with sentence-transformers files (modules.json, 1_Pooling/config.json,
sentence_bert_config.json) so `SentenceTransformer` loads it as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_models import _CORPUS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def build_tiny_bert(path: Path, *, seed: int = 0, masked_lm: bool = False, pooling: str | None = None,
                    normalize: bool = False, max_seq_length: int | None = None,
                    config_extra: dict | None = None, **overrides) -> Path:
    """Write a tiny random BERT directory to `path`.

    `masked_lm`: save a `BertForMaskedLM` (weights under `bert.`, with the MLM head).
    `pooling` (a sentence-transformers pooling mode): also write sentence-transformers
    files with that pooling, a Normalize module when `normalize`, and `max_seq_length`.
    `config_extra`: keys merged into config.json after saving (e.g. matryoshka_dimensions).
    """
    import transformers

    tok = build_wordpiece_tokenizer()
    config = transformers.BertConfig(**{
        **dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
               pad_token_id=0, hidden_act="gelu"),
        **overrides})
    torch.manual_seed(seed)
    model = (transformers.BertForMaskedLM if masked_lm else transformers.BertModel)(config)
    with torch.no_grad():  # random init is small; widen it so outputs are well spread
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if config_extra:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **config_extra}))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}))
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (path / "modules.json").write_text(json.dumps(modules))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": config.hidden_size,
            **{f"pooling_mode_{k}": pooling == v for k, v in (
                ("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"),
                ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens"), ("lasttoken", "lasttoken"))}}))
        (path / "sentence_bert_config.json").write_text(json.dumps({
            "max_seq_length": max_seq_length or config.max_position_embeddings, "do_lower_case": False}))
    return path
