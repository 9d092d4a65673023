"""The BERT encoder (Hugging Face `BertModel`), for embedding models.

Token, position and token-type embeddings with a LayerNorm, then post-norm layers
of self-attention and a GELU feed-forward block, as transformers computes them.
It runs padded batches `[batch, length]` with a boolean padding mask through
`F.scaled_dot_product_attention` and returns the last hidden states; pooling and
normalization belong to the embedder (engine/embedding/embedder.py), which knows the
sentence-transformers configuration. q/k/v are fused into one matmul, as in
llama.py; `load_weights` fuses the HF-named tensors on the way in.

Checkpoints of `BertModel` and `BertForMaskedLM` load alike: a `bert.` prefix is
dropped and the pooler and masked-LM head are skipped, since embeddings are
pooled from the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.linear import Embedding, Linear

_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# heads and buffers that carry nothing the encoder's hidden states need
_SKIPPED_PREFIXES = ("pooler.", "cls.")
_SKIPPED_SUFFIXES = ("position_ids",)

# HF name inside `encoder.layer.N.` -> ours inside `layers.N.`
_LAYER_NAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_QKV = ("query", "key", "value")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig:
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: {act!r} is not supported (one of {', '.join(_ACTIVATIONS)})")
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type: {pos!r} is not supported (only 'absolute')")
        if config["hidden_size"] % config["num_attention_heads"]:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"], hidden_act=act,
            max_position_embeddings=config.get("max_position_embeddings", 512),
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            pad_token_id=config.get("pad_token_id") or 0,
        )


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig, dtype=None, device=None):
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype, device)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype, device)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # single-segment inputs: token type 0 everywhere; the additions in transformers' order
        h = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        h = h + self.position_embeddings.weight[:input_ids.shape[1]]
        return self.LayerNorm(h)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, dtype=None, device=None):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.qkv = Linear(h, 3 * h, bias=True, dtype=dtype, device=device)
        self.attn_out = Linear(h, h, bias=True, dtype=dtype, device=device)
        self.attn_norm = nn.LayerNorm(h, eps, dtype=dtype, device=device)
        self.ffn_in = Linear(h, cfg.intermediate_size, bias=True, dtype=dtype, device=device)
        self.ffn_out = Linear(cfg.intermediate_size, h, bias=True, dtype=dtype, device=device)
        self.ffn_norm = nn.LayerNorm(h, eps, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, n, h)))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertModel(nn.Module):
    """Allocated uninitialized in `dtype` on `device`; `load_weights` fills every weight."""

    def __init__(self, cfg: BertConfig, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, dtype, device)
        self.layers = nn.ModuleList(BertLayer(cfg, dtype, device) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [batch, length]; attention_mask [batch, length] bool, True on real tokens
        (None: no padding). Returns the last hidden states [batch, length, hidden]."""
        # a boolean mask over keys, broadcast over heads and queries; padded query rows
        # still attend to real keys (never to nothing), and pooling ignores them
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, mask)
        return h

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v; every parameter must be set."""
        params = dict(self.named_parameters())
        hidden = self.cfg.hidden_size
        loaded: set[str] = set()
        for name, value in tensors.items():
            name = name.removeprefix("bert.")
            if name.startswith(_SKIPPED_PREFIXES) or name.endswith(_SKIPPED_SUFFIXES):
                continue
            # checkpoints from old TF conversions name LayerNorm parameters gamma/beta
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            target, rows = _our_name(name, hidden)
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            dest = params[target] if rows is None else params[target][rows]
            if dest.shape != value.shape:
                raise ValueError(f"weight {name}: checkpoint shape {tuple(value.shape)} "
                                 f"!= model shape {tuple(dest.shape)}")
            dest.copy_(value)
            loaded.add(target if rows is None else f"{target}[{rows.start}]")
        expected = set()
        for pname in params:
            if ".qkv." in pname:
                expected |= {f"{pname}[{i * hidden}]" for i in range(3)}
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")


def _our_name(name: str, hidden: int) -> tuple[str, slice | None]:
    """HF parameter name -> (our parameter name, rows of it), q/k/v going into `qkv`."""
    if not name.startswith("encoder.layer."):
        return name, None
    index, rest = name[len("encoder.layer."):].split(".", 1)
    module, param = rest.rsplit(".", 1)
    for i, part in enumerate(_QKV):
        if module == f"attention.self.{part}":
            return f"layers.{index}.qkv.{param}", slice(i * hidden, (i + 1) * hidden)
    return f"layers.{index}.{_LAYER_NAMES.get(module, module)}.{param}", None


def build_bert(config: dict[str, Any], tensors: dict[str, torch.Tensor],
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> BertModel:
    """A `BertModel` from an HF config dict and HF-named tensors, ready for inference."""
    model = BertModel(BertConfig.from_hf(config), dtype, torch.device(device))
    model.load_weights(tensors)
    return model.eval()
