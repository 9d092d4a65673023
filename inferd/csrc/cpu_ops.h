// The CPU kernels' entry points (cpu_ops.cpp), shared with decode_layers.cpp.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace inferd {

void rms_norm(torch::Tensor out, torch::Tensor x, c10::optional<torch::Tensor> residual,
              torch::Tensor weight, double eps);
void silu_and_mul(torch::Tensor out, torch::Tensor gate_up);
void rope(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin);
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots, c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor q_rows, double scale,
                      c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);

torch::Tensor decode_layers(torch::Tensor residual, const std::vector<std::vector<torch::Tensor>>& layers,
                            torch::Tensor final_norm, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor q_rows,
                            std::vector<int64_t> shape, double eps, double scale, int64_t int8_max_rows,
                            int64_t int4_max_rows, int64_t activation_terms);

// matmul against a GGUF file's packed quantized blocks (quant_matmul.cpp)
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor d, torch::Tensor m,
                           int64_t out_features, bool reference, int64_t terms);
std::string quant_matmul_path();

}  // namespace inferd
