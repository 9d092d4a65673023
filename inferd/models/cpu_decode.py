"""Decode-only steps on the CPU in one C++ call for all layers (csrc/decode_layers.cpp).

With one new token per request, each layer's arithmetic is small and the Python
around it (module calls, a dozen op dispatches) is a large part of a step at low
concurrency. When the fused CPU kernels are built and a step holds only decodes,
`LlamaForCausalLM.forward` hands the whole layer stack to `decode_layers`, which
runs the same kernels and the same matmul choices as the Python path (a GGUF
file's own blocks, or int4/int8 copies for few rows, see layers/linear.py).
Steps with prompt chunks, models with q/k norms and non-CPU devices take the
Python path.
"""

from __future__ import annotations

import torch

from inferd.layers import linear as linear_mod
from inferd.layers import quant_blocks
from inferd.layers.attention import AttentionMetadata
from inferd.layers.cpu_kernels import ops_for
from inferd.layers.kv_storage import QuantizedKV

_EMPTY = torch.empty(0)


def _proj(lin: linear_mod.Linear) -> list[torch.Tensor]:
    packed = lin.packed
    blocks = (packed.packed, packed.d, packed.m) if packed is not None else (None, None, None)
    parts = (lin.weight, lin.bias, lin.qweight, lin.qscale, lin.q4weight, lin.q4scales, *blocks)
    return [_EMPTY if t is None else t for t in parts]


def _layer_tensors(model, kv_caches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per layer, the tensors decode_layers reads, in its order; built again only when the
    cache list or the quantized copies change (the key holds them, so identity is safe)."""
    first = model.layers[0].self_attn.qkv_proj
    key = (kv_caches, first.qweight, first.q4weight, first.packed)
    cached = getattr(model, "_cpu_decode_layers", None)
    if cached is not None and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    layers = []
    for layer, cache in zip(model.layers, kv_caches):
        a, m = layer.self_attn, layer.mlp
        if isinstance(cache, QuantizedKV):  # int8 levels and their scales
            storage = [cache.data[0], cache.data[1], cache.scales[0], cache.scales[1]]
        else:
            storage = [cache[0], cache[1], _EMPTY, _EMPTY]
        layers.append([layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                       *_proj(a.qkv_proj), *_proj(a.o_proj), *_proj(m.gate_up_proj), *_proj(m.down_proj),
                       *storage])
    model._cpu_decode_layers = (key, layers)
    return layers


def _activation_terms(model) -> int:
    """The int8 activation terms of the model's GGUF-block projections (one setting for all,
    use_gguf_blocks, so the first layer's tell); unused when it has none."""
    a, m = model.layers[0].self_attn, model.layers[0].mlp
    packed = next((p.packed for p in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
                   if p.packed is not None), None)
    return packed.terms if packed is not None else quant_blocks.ACTIVATION_TERMS


def decode_layers(model, residual: torch.Tensor, rope_tables, kv_caches: list[torch.Tensor],
                  meta: AttentionMetadata) -> torch.Tensor | None:
    """Final hidden states for a decode-only step, or None where this path does not apply."""
    ops = ops_for(residual)
    groups = meta.prepared
    if ops is None or not isinstance(groups, list) or len(groups) != 1 or not groups[0].decode or not model.layers:
        return None
    if isinstance(kv_caches[0], QuantizedKV) and not kv_caches[0].in_kernel_form:
        return None  # fp8: the torch path
    attn = model.layers[0].self_attn
    if attn.q_norm is not None:
        return None
    g = groups[0]
    cfg = model.cfg
    return ops.decode_layers(
        residual, _layer_tensors(model, kv_caches), model.norm.weight, rope_tables[0], rope_tables[1],
        meta.slot_mapping, g.tables, g.seq_lens, g.out_index,
        [attn.n_heads, attn.n_kv, attn.head_dim, cfg.intermediate_size],
        cfg.rms_norm_eps, attn.scale, linear_mod.INT8_MAX_ROWS, linear_mod.INT4_MAX_ROWS,
        _activation_terms(model))
