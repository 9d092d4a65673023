// Every decoder layer of a decode-only step in one call (models/cpu_decode.py).
//
// With one new token per request, a step's work per layer is small and the Python
// around it (module calls, dispatch of ~12 ops) costs about as much as the
// arithmetic at one request. This loop runs the same ops as LlamaForCausalLM.forward
// with the same kernels and matmul choices (Linear.forward), from C++.

#include "cpu_ops.h"

namespace inferd {
namespace {

// One projection's tensors, in the order models/cpu_decode.py lays them out;
// absent ones are empty tensors.
struct Proj {
  const torch::Tensor &weight, &bias, &q8, &s8, &q4, &q4_scales, &packed, &packed_d, &packed_m;
};

// Linear.forward: a GGUF file's own blocks for every batch size (quant_matmul.cpp); else
// 4-bit or int8 copies for few rows, else the dtype's weight
torch::Tensor project(const torch::Tensor& x, const Proj& p, int64_t out_features, int64_t int8_max_rows,
                      int64_t int4_max_rows, int64_t activation_terms) {
  const int64_t rows = x.size(0);
  torch::Tensor out;
  if (p.packed.numel()) {
    out = quant_matmul(x, p.packed, p.packed_d, p.packed_m, out_features, false, activation_terms);
  } else if (p.q4.numel() && rows <= int4_max_rows) {
    // the scales are [in_features / group, out_features, 2]: the group size follows from them
    const int64_t group = x.size(1) / p.q4_scales.size(0);
    out = at::_weight_int4pack_mm_for_cpu(x, p.q4, group, p.q4_scales);
  } else if (p.q8.numel() && rows <= int8_max_rows) {
    out = at::_weight_int8pack_mm(x, p.q8, p.s8);
  } else {
    return at::linear(x, p.weight, p.bias.numel() ? c10::optional<torch::Tensor>(p.bias) : c10::nullopt);
  }
  return p.bias.numel() ? out.add_(p.bias) : out;
}

// out = rmsnorm(residual += x); with no x yet (before the first layer), rmsnorm(residual)
void add_norm(torch::Tensor& out, const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight,
              double eps) {
  if (x.defined()) {
    rms_norm(out, x, residual, weight, eps);
  } else {
    rms_norm(out, residual, c10::nullopt, weight, eps);
  }
}

constexpr int64_t kPerProj = 9;
// 2 norms, 4 projections, K and V caches, their scales (empty unless the cache is int8)
constexpr int64_t kPerLayer = 2 + 4 * kPerProj + 4;

c10::optional<torch::Tensor> present(const torch::Tensor& t) {
  return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}

}  // namespace

torch::Tensor decode_layers(torch::Tensor residual, const std::vector<std::vector<torch::Tensor>>& layers,
                            torch::Tensor final_norm, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor q_rows,
                            std::vector<int64_t> shape, double eps, double scale, int64_t int8_max_rows,
                            int64_t int4_max_rows, int64_t activation_terms) {
  TORCH_CHECK(shape.size() == 4, "decode_layers: shape is (heads, kv_heads, head_dim, intermediate)");
  const int64_t n_heads = shape[0], n_kv = shape[1], dim = shape[2], inter = shape[3];
  const int64_t tokens = residual.size(0), q_size = n_heads * dim, kv_size = n_kv * dim;
  torch::Tensor x;
  for (const auto& layer : layers) {
    TORCH_CHECK(int64_t(layer.size()) == kPerLayer, "decode_layers: ", kPerLayer, " tensors per layer");
    auto proj = [&](int64_t i) {
      const int64_t b = 2 + i * kPerProj;
      return Proj{layer[b],     layer[b + 1], layer[b + 2], layer[b + 3], layer[b + 4],
                  layer[b + 5], layer[b + 6], layer[b + 7], layer[b + 8]};
    };
    torch::Tensor normed = torch::empty_like(residual);
    add_norm(normed, x, residual, layer[0], eps);
    torch::Tensor qkv = project(normed, proj(0), q_size + 2 * kv_size, int8_max_rows, int4_max_rows, activation_terms);
    torch::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, n_heads, dim});
    torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, n_kv, dim});
    torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, n_kv, dim});
    rope(q, k, cos, sin);
    const torch::Tensor &k_cache = layer[kPerLayer - 4], &v_cache = layer[kPerLayer - 3];
    const auto k_scales = present(layer[kPerLayer - 2]), v_scales = present(layer[kPerLayer - 1]);
    write_kv(k_cache, v_cache, k, v, slots, k_scales, v_scales);
    torch::Tensor attn = torch::empty({tokens, q_size}, residual.options());
    decode_attention(attn, q, k_cache, v_cache, block_tables, seq_lens, q_rows, scale, k_scales, v_scales);
    torch::Tensor o = project(attn, proj(1), residual.size(1), int8_max_rows, int4_max_rows, activation_terms);
    rms_norm(normed, o, residual, layer[1], eps);
    torch::Tensor gate_up = project(normed, proj(2), 2 * inter, int8_max_rows, int4_max_rows, activation_terms);
    torch::Tensor act = torch::empty({tokens, inter}, residual.options());
    silu_and_mul(act, gate_up);
    x = project(act, proj(3), residual.size(1), int8_max_rows, int4_max_rows, activation_terms);
  }
  torch::Tensor out = torch::empty_like(residual);
  add_norm(out, x, residual, final_norm, eps);
  return out;
}

}  // namespace inferd
