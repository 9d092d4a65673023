"""The SigLIP vision encoder and the pixel-shuffle connector of Idefics3 (SmolVLM).

`VisionEncoder.forward(pixels)` takes an image's tiles, [tiles, 3, H, W] normalized
pixels (engine/image_processor.py makes them), and returns the embeddings that take
the place of its `<image>` tokens in the prompt: [tiles * tokens_per_tile, text hidden],
tile by tile in the order the prompt lists them. Per tile: a strided convolution cuts
it into patches, learned position embeddings are added (Idefics3's NaViT-style lookup:
a tile of any patch grid maps its fractional coordinates onto the trained grid), the
pre-norm transformer layers run with bidirectional attention (torch's SDPA), a final
LayerNorm, then the connector folds each `scale_factor` x `scale_factor` block of
patches into one vector (pixel shuffle) and projects it to the decoder's width.

Every tile of an image is full (the processor resizes to whole tiles), so no attention
mask is needed. Weights keep their Hugging Face names under `vision_model.` and
`connector.`; `load_weights` checks that each is set.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.linear import Linear


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    scale_factor: int
    text_hidden_size: int

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "VisionConfig":
        """From an Idefics3 config.json; missing vision keys take Idefics3VisionConfig's defaults."""
        v = cfg.get("vision_config") or {}
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_act: {act!r} is not supported (gelu_pytorch_tanh is)")
        return cls(hidden_size=v.get("hidden_size", 1152), intermediate_size=v.get("intermediate_size", 3072),
                   num_layers=v.get("num_hidden_layers", 12), num_heads=v.get("num_attention_heads", 16),
                   image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                   layer_norm_eps=v.get("layer_norm_eps", 1e-6), scale_factor=cfg.get("scale_factor", 2),
                   text_hidden_size=cfg["text_config"]["hidden_size"])

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile of `image_size` pixels stands for (the processor's image_seq_len)."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor ** 2


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype=None, device=None):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, dtype, device)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Linear(d, d, bias=True, dtype=dtype, device=device) for _ in range(4))
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, dtype, device)
        self.fc1 = Linear(d, cfg.intermediate_size, bias=True, dtype=dtype, device=device)
        self.fc2 = Linear(cfg.intermediate_size, d, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.layer_norm1.forward(x)
        q, k, v = (p.forward(h).view(b, s, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.out_proj.forward(attn)
        h = self.fc2.forward(F.gelu(self.fc1.forward(self.layer_norm2.forward(x)), approximate="tanh"))
        return x + h


class VisionEncoder(nn.Module):
    """Allocated uninitialized in `dtype` on `device`; `load_weights` fills every weight."""

    def __init__(self, cfg: VisionConfig, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_weight = nn.Parameter(torch.empty(d, 3, p, p, dtype=dtype, device=device), requires_grad=False)
        self.patch_bias = nn.Parameter(torch.empty(d, dtype=dtype, device=device), requires_grad=False)
        self.per_side = cfg.image_size // p
        self.position_embedding = nn.Parameter(torch.empty(self.per_side ** 2, d, dtype=dtype, device=device),
                                               requires_grad=False)
        self.layers = nn.ModuleList(EncoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps, dtype, device)
        self.projection = Linear(d * cfg.scale_factor ** 2, cfg.text_hidden_size, dtype=dtype, device=device)

    def _position_ids(self, rows: int, cols: int, device) -> torch.Tensor:
        """Idefics3's lookup: patch (r, c) of a rows x cols grid takes the trained grid's entry at its
        fractional coordinates (the identity when the tile is `image_size` pixels)."""
        n = self.per_side
        boundaries = torch.arange(1 / n, 1.0, 1 / n, device=device)

        def buckets(count: int) -> torch.Tensor:
            frac = (torch.arange(count, device=device, dtype=torch.float32) * (1.0 / count)).clamp(max=1 - 1e-6)
            return torch.bucketize(frac, boundaries, right=True)

        return (buckets(rows)[:, None] * n + buckets(cols)[None, :]).reshape(-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles * tokens_per_tile, text hidden]."""
        steps = self.steps(pixels)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def steps(self, pixels: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """`forward` in small units: a generator that pauses after the patch embedding of a tile and after
        each encoder layer of a tile, and returns the output. The engine interleaves the units with
        model steps (engine/core/vision.py), so an image never holds up decoding for long."""
        pixels = pixels.to(self.patch_weight.dtype)
        outputs = []
        for tile in pixels.split(1):
            x = F.conv2d(tile, self.patch_weight, self.patch_bias, stride=self.cfg.patch_size)
            _, d, rows, cols = x.shape
            x = x.flatten(2).transpose(1, 2) + self.position_embedding[self._position_ids(rows, cols, x.device)]
            yield
            for layer in self.layers:
                x = layer.forward(x)
                yield
            x = self.post_layernorm.forward(x)
            outputs.append(self.projection.forward(pixel_shuffle(x, rows, cols, self.cfg.scale_factor)))
        return torch.cat(outputs).reshape(-1, self.cfg.text_hidden_size)

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """HF-named tensors (`vision_model.*`, `connector.*`, the `model.` prefix already taken off)."""
        params = dict(self.named_parameters())
        renames = {"vision_model.embeddings.patch_embedding.weight": "patch_weight",
                   "vision_model.embeddings.patch_embedding.bias": "patch_bias",
                   "vision_model.embeddings.position_embedding.weight": "position_embedding",
                   "vision_model.post_layernorm.weight": "post_layernorm.weight",
                   "vision_model.post_layernorm.bias": "post_layernorm.bias",
                   "connector.modality_projection.proj.weight": "projection.weight"}
        loaded = set()
        for name, value in tensors.items():
            ours = renames.get(name) or (name.removeprefix("vision_model.encoder.")
                                         .replace("self_attn.", "").replace("mlp.", ""))
            if ours not in params:
                raise ValueError(f"unexpected vision weight {name!r} in checkpoint")
            if params[ours].shape != value.shape:
                raise ValueError(f"weight {name}: checkpoint shape {tuple(value.shape)} "
                                 f"!= model shape {tuple(params[ours].shape)}")
            params[ours].copy_(value)
            loaded.add(ours)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing vision weights: {sorted(missing)[:8]}")


def pixel_shuffle(x: torch.Tensor, rows: int, cols: int, scale: int) -> torch.Tensor:
    """[tiles, rows * cols, d] -> [tiles, rows * cols / scale^2, d * scale^2], as Idefics3's connector
    folds it (each output vector holds a scale x scale block of patches, in HF's element order)."""
    tiles, seq, d = x.shape
    x = x.view(tiles, rows, cols // scale, d * scale).permute(0, 2, 1, 3)
    x = x.reshape(tiles, cols // scale, rows // scale, d * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(tiles, seq // scale ** 2, d * scale * scale)
