"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2).

Works on a flat batch of tokens from many requests (see layers/attention.py).
Submodules are called through `.forward` directly: nn.Module's `__call__` (hook
handling) costs ~1.5 us a call, and a decode step makes ~250 of them.
q/k/v and gate/up projections are fused into one matmul each, which is what makes
small-batch decode fast on CPU; `load_weights` fuses HF-named tensors on the way in.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from inferd.layers import quant_blocks
from inferd.layers.activation import silu_and_mul
from inferd.layers.attention import AttentionBackend, AttentionMetadata
from inferd.layers.linear import Embedding, Linear
from inferd.layers.norm import RMSNorm
from inferd.layers.rope import RotaryEmbedding, apply_rope
from inferd.models.config import ModelConfig
from inferd.models.cpu_decode import decode_layers


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias,
                                  dtype=dtype, device=device)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False, dtype=dtype, device=device)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def forward(self, x, rope_tables, kv_cache, meta, backend: AttentionBackend):
        t = x.shape[0]
        q, k, v = self.qkv_proj.forward(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv, self.head_dim)
        v = v.view(t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, rope_tables)
        return self.o_proj.forward(backend.forward(q, k, v, kv_cache, meta, self.scale))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, bias=False, dtype=dtype, device=device)
        self.down_proj = Linear(self.inter, cfg.hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj.forward(silu_and_mul(self.gate_up_proj.forward(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Allocated uninitialized in `dtype` on `device`; `load_weights` fills every weight."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        # tables stay fp32, as HF computes them
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings,
                                    cfg.rope_theta, cfg.rope_scaling).to(device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend, input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Returns final hidden states [T, hidden] for the flat batch.

        `input_embeds` (rows, embeddings) replaces the token embeddings of those rows of the
        batch: a vision-language model's image tokens take its vision encoder's output there.
        The residual stream is carried apart from each sublayer's output, so every
        norm also does the residual add before it (one fused kernel on the CPU)."""
        residual = self.embed_tokens(input_ids)
        if input_embeds is not None:
            rows, embeds = input_embeds
            residual.index_copy_(0, rows, embeds.to(residual.dtype))
        rope_tables = self.rope.tables(positions, residual.dtype)
        fused = decode_layers(self, residual, rope_tables, kv_caches, meta)
        if fused is not None:
            return fused
        x = None
        for layer, cache in zip(self.layers, kv_caches):
            if x is None:
                x = layer.input_layernorm.forward(residual)
            else:
                x, residual = layer.input_layernorm.forward(x, residual)
            x = layer.self_attn.forward(x, rope_tables, cache, meta, backend)
            x, residual = layer.post_attention_layernorm.forward(x, residual)
            x = layer.mlp.forward(x)
        if x is None:
            return self.norm(residual)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def use_gguf_blocks(self, quantized: dict, terms: int = quant_blocks.ACTIVATION_TERMS) -> int:
        """Compute every projection whose GGUF tensors are in packable blocks with those blocks
        (layers/quant_blocks.py), activations split into `terms` int8 terms; `quantized` is
        Checkpoint.quantized. Returns how many layers did; the others (float tensors in the
        file, mixed types in a fused projection) keep their float weights."""
        if self.embed_tokens.weight.device.type != "cpu":
            raise ValueError("quantization: gguf runs on the CPU")

        def packed(name: str) -> quant_blocks.PackedWeight | None:
            t = quantized.get(name)
            if t is None or t.kind not in quant_blocks.PACKABLE:
                return None
            return quant_blocks.pack(t.data, t.kind, t.shape, terms)

        def fused(names: list[str]) -> quant_blocks.PackedWeight | None:
            parts = [packed(n) for n in names]
            return quant_blocks.concat(parts) if all(p is not None for p in parts) else None

        plan: list[tuple[Linear, quant_blocks.PackedWeight | None]] = []
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}"
            plan += [
                (layer.self_attn.qkv_proj, fused([f"{pre}.self_attn.{p}_proj.weight" for p in "qkv"])),
                (layer.self_attn.o_proj, packed(f"{pre}.self_attn.o_proj.weight")),
                (layer.mlp.gate_up_proj, fused([f"{pre}.mlp.{p}_proj.weight" for p in ("gate", "up")])),
                (layer.mlp.down_proj, packed(f"{pre}.mlp.down_proj.weight")),
            ]
        tied = self.cfg.tie_word_embeddings
        plan.append((self.lm_head, packed("model.embed_tokens.weight" if tied else "lm_head.weight")))
        done = 0
        for linear, weight in plan:
            if weight is not None:
                linear.use_blocks(weight, keep_weight=linear is self.lm_head and tied)
                done += 1
        self.__dict__.pop("_cpu_decode_layers", None)
        return done

    def quantize(self, kind: str) -> None:
        """Add int8 or int4 copies of the weights for small batches (layers/linear.py)."""
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            raise ValueError(f"quantization: {kind} needs the CPU and dtype bfloat16")
        for module in self.modules():
            if not isinstance(module, Linear):
                continue
            # the output head stays at 8 bits under int4: it scores the whole vocabulary,
            # and GGUF files keep it above 4 bits too (Q8_0 in the default model's Q4_1 file)
            if kind == "int8" or module is self.lm_head:
                module.quantize_int8()
            else:
                module.quantize_int4()

    def sharing_weights(self) -> "LlamaForCausalLM":
        """A second model over the same weight tensors, without their quantized copies: quantized on
        its own, it is the same weights at another precision for the price of the copies alone."""
        shared = {id(t): t for m in self.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)}
        shared.update({id(t): t for t in (*self.parameters(), *self.buffers())})
        twin = copy.deepcopy(self, shared)
        twin.__dict__.pop("_cpu_decode_layers", None)  # the fused decode path's per-model tensor list
        for module in twin.modules():
            if isinstance(module, Linear):
                module.qweight = module.qscale = module.q4weight = module.q4scales = None
        return twin

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, value: torch.Tensor, rows: slice | None = None):
            p = params[name]
            target = p if rows is None else p[rows]
            if target.shape != value.shape:
                raise ValueError(f"weight {name}: checkpoint shape {tuple(value.shape)} "
                                 f"!= model shape {tuple(target.shape)}")
            target.copy_(value)
            loaded.add(name if rows is None else f"{name}[{rows.start}]")

        a = self.layers[0].self_attn if self.layers else None
        for name, value in tensors.items():
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            done = False
            for src, offset_of in (("q_proj", lambda: 0), ("k_proj", lambda: a.q_size),
                                   ("v_proj", lambda: a.q_size + a.kv_size)):
                if f"self_attn.{src}." in name:
                    size = a.q_size if src == "q_proj" else a.kv_size
                    off = offset_of()
                    put(name.replace(src, "qkv_proj"), value, slice(off, off + size))
                    done = True
            for i, src in enumerate(("gate_proj", "up_proj")):
                if f"mlp.{src}." in name:
                    inter = self.cfg.intermediate_size
                    put(name.replace(src, "gate_up_proj"), value, slice(i * inter, (i + 1) * inter))
                    done = True
            if not done:
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                put(name, value)
        expected = _expected_loads(self)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")


def _expected_loads(model: LlamaForCausalLM) -> set[str]:
    a = model.layers[0].self_attn
    inter = model.cfg.intermediate_size
    names = set()
    for name, _ in model.named_parameters():
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            names |= {f"{name}[0]", f"{name}[{a.q_size}]", f"{name}[{a.q_size + a.kv_size}]"}
        elif "gate_up_proj" in name:
            names |= {f"{name}[0]", f"{name}[{inter}]"}
        else:
            names.add(name)
    return names
