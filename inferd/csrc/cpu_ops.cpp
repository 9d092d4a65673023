// Fused CPU kernels for the decoder's small ops, compiled on first use
// (inferd/layers/cpu_kernels.py). Each one replaces several eager torch ops, whose
// per-call overhead dominates a decode step with few rows, and the paged decode
// attention reads K/V blocks where they lie instead of gathering a padded copy.
//
// Numerics follow the torch path they replace: element-wise results are rounded to
// the tensor's dtype after every operation the torch code does in that dtype (so
// rope and the norms give the same bits), and reductions run in fp32.

#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace inferd {

// Load/store/round for each dtype; `round` is the value a float takes when stored
// in the dtype and read back.
template <typename T> struct Num;

template <> struct Num<float> {
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float x) { *p = x; }
  static inline float round(float x) { return x; }
};

template <> struct Num<at::BFloat16> {
  static inline float load(const at::BFloat16* p) {
    uint32_t bits = uint32_t(p->x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static inline uint16_t to_bits(float x) {  // round to nearest even, as c10 does
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  static inline void store(at::BFloat16* p, float x) { p->x = to_bits(x); }
  static inline float round(float x) {
    uint32_t bits = uint32_t(to_bits(x)) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

template <> struct Num<at::Half> {
  static inline float load(const at::Half* p) { return float(*p); }
  static inline void store(at::Half* p, float x) { *p = at::Half(x); }
  static inline float round(float x) { return float(at::Half(x)); }
};

// int8 KV cache entries: read only (the write quantizes, see write_kv)
template <> struct Num<int8_t> {
  static inline float load(const int8_t* p) { return float(*p); }
};

// Calls f(T{}) for the dtypes the engine runs in (float32, bfloat16, float16).
template <typename F>
void dispatch(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", type);
  }
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// ---- RMSNorm (optionally fused with the residual add before it) ----------------
// torch: h = residual + x (in dtype); out = w * (rms_norm(h.float())).to(dtype)

template <typename T>
void rms_norm_impl(torch::Tensor& out, const torch::Tensor& x, torch::Tensor* residual,
                   const torch::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* w = weight.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(cols);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x.data_ptr<T>() + r * x.stride(0);
      T* o = out.data_ptr<T>() + r * out.stride(0);
      if (residual) {
        T* res = residual->data_ptr<T>() + r * residual->stride(0);
        for (int64_t c = 0; c < cols; ++c) {
          h[c] = Num<T>::round(Num<T>::load(res + c) + Num<T>::load(xr + c));
          Num<T>::store(res + c, h[c]);
        }
      } else {
        for (int64_t c = 0; c < cols; ++c) h[c] = Num<T>::load(xr + c);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) ss += h[c] * h[c];
      const float inv = 1.f / std::sqrt(ss / float(cols) + float(eps));
      for (int64_t c = 0; c < cols; ++c)
        Num<T>::store(o + c, Num<T>::load(w + c) * Num<T>::round(h[c] * inv));
    }
  });
}

void rms_norm(torch::Tensor out, torch::Tensor x, c10::optional<torch::Tensor> residual,
              torch::Tensor weight, double eps) {
  check_cpu(x, "x");
  check_cpu(out, "out");
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes(), "rms_norm: x and out must be [rows, dim]");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight must be [dim]");
  torch::Tensor* res = nullptr;
  if (residual.has_value()) {
    check_cpu(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must match x");
    res = &residual.value();
  }
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag); rms_norm_impl<scalar_t>(out, x, res, weight, eps); });
}

// ---- rotary embedding, in place on q and k ------------------------------------------
// torch (rotate-half): cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), each op in dtype;
// cos/sin are the step's tables, [T, D/2] in the dtype

template <typename T>
void rope_one(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = Num<T>::load(x + i), x2 = Num<T>::load(x + half + i);
    const float c = Num<T>::load(cos + i), s = Num<T>::load(sin + i);
    const float a = Num<T>::round(Num<T>::round(x1 * c) - Num<T>::round(x2 * s));
    const float b = Num<T>::round(Num<T>::round(x2 * c) + Num<T>::round(x1 * s));
    Num<T>::store(x + i, a);
    Num<T>::store(x + half + i, b);
  }
}

template <typename T>
void rope_impl(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t tokens = q.size(0), nq = q.size(1), nk = k.size(1), half = q.size(2) / 2;
  at::parallel_for(0, tokens, 32, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos.data_ptr<T>() + t * cos.stride(0);
      const T* s = sin.data_ptr<T>() + t * sin.stride(0);
      for (int64_t h = 0; h < nq; ++h) rope_one<T>(q.data_ptr<T>() + t * q.stride(0) + h * q.stride(1), c, s, half);
      for (int64_t h = 0; h < nk; ++h) rope_one<T>(k.data_ptr<T>() + t * k.stride(0) + h * k.stride(1), c, s, half);
    }
  });
}

void rope(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  for (auto* t : {&q, &k}) check_cpu(*t, "q/k");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(2) == k.size(2) && q.size(0) == k.size(0),
              "rope: q and k must be [tokens, heads, head_dim]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == q.size(0) && cos.size(1) * 2 == q.size(2)
                  && cos.sizes() == sin.sizes() && cos.stride(1) == 1 && sin.stride(1) == 1
                  && cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(),
              "rope: cos and sin must be [tokens, head_dim / 2] in q's dtype");
  dispatch(q.scalar_type(), "rope", [&](auto tag) {
    using scalar_t = decltype(tag); rope_impl<scalar_t>(q, k, cos, sin); });
}

// ---- paged KV cache: write new tokens, attend decode queries in place -----------------
// cache layout per layer: k_cache, v_cache [blocks, block_size, kv_heads, head_dim]

// int8 caches hold each token's head as int8 levels and one fp32 scale (per token, per
// head: absmax / 127), so a block holds K/V in a bit over a quarter of fp32's bytes and
// half of bf16's; the torch path (layers/kv_quant.py) quantizes with the same arithmetic.
template <typename T>
void quantize_rows(int8_t* q, float* scales, const T* x, int64_t heads, int64_t dim) {
  for (int64_t h = 0; h < heads; ++h, x += dim, q += dim) {
    float amax = 0.f;
    for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(Num<T>::load(x + d)));
    scales[h] = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t d = 0; d < dim; ++d)
      q[d] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(Num<T>::load(x + d) * inv))));
  }
}

void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots, c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "write_kv: caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "write_kv: slots must be int64");
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == (k_scales.has_value() && v_scales.has_value()),
              "write_kv: an int8 cache needs its scales, and only an int8 cache has them");
  TORCH_CHECK(quantized ? v_cache.scalar_type() == at::kChar && k.scalar_type() == v.scalar_type()
                        : k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "write_kv: dtype mismatch");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "write_kv: each token's heads must be contiguous");
  const int64_t tokens = k.size(0), heads = k.size(1), dim = k.size(2);
  const int64_t row = heads * dim;  // elements per token
  const int64_t n_slots = k_cache.numel() / row;
  TORCH_CHECK(k_cache.numel() == n_slots * row, "write_kv: cache shape does not match k");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < n_slots, "write_kv: slot out of range");
  if (quantized) {
    for (auto* s : {&*k_scales, &*v_scales})
      TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == n_slots * heads,
                  "write_kv: scales must be fp32 [blocks, block_size, kv_heads]");
    auto* kq = k_cache.data_ptr<int8_t>();
    auto* vq = v_cache.data_ptr<int8_t>();
    float* ks = k_scales->data_ptr<float>();
    float* vs = v_scales->data_ptr<float>();
    dispatch(k.scalar_type(), "write_kv", [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* kp = k.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      for (int64_t t = 0; t < tokens; ++t) {
        quantize_rows(kq + slot[t] * row, ks + slot[t] * heads, kp + t * k.stride(0), heads, dim);
        quantize_rows(vq + slot[t] * row, vs + slot[t] * heads, vp + t * v.stride(0), heads, dim);
      }
    });
    return;
  }
  const int64_t bytes = row * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(kc + slot[t] * bytes, ks + t * k.stride(0) * k.element_size(), bytes);
    std::memcpy(vc + slot[t] * bytes, vs + t * v.stride(0) * v.element_size(), bytes);
  }
}

// e^x for x <= 0 (softmax inputs once the maximum is subtracted): 2^n * p(r), the
// Cephes polynomial, within ~2 ulp of expf; written so the compiler vectorizes it.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The vector operations the softmax and the decode attention use, for the instruction set
// built for: 16 lanes with AVX-512, 8 with AVX2 (+ FMA)
struct Lanes {
#ifdef __AVX512F__
  using V = __m512;
  using I = __m512i;
  static constexpr int64_t n = 16;
  static V loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V floor(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  // 2^n for whole-numbered n in float range
  static V pow2(V n) {
    const I bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(bits);
  }
  static float sum(V x) { return _mm512_reduce_add_ps(x); }
#else
  using V = __m256;
  using I = __m256i;
  static constexpr int64_t n = 8;
  static V loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V floor(V x) { return _mm256_floor_ps(x); }
  static V pow2(V n) {
    const I bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(bits);
  }
  static float sum(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
#endif
};

// the same function, Lanes::n lanes at a time
inline Lanes::V exp_nonpositive(Lanes::V x) {
  using L = Lanes;
  x = L::max(x, L::set1(-87.f));
  const L::V n = L::floor(L::fmadd(x, L::set1(1.44269504088896341f), L::set1(0.5f)));
  const L::V r = L::fmadd(n, L::set1(2.12194440e-4f), L::fnmadd(n, L::set1(0.693359375f), x));
  L::V p = L::set1(1.9875691500e-4f);
  p = L::fmadd(p, r, L::set1(1.3981999507e-3f));
  p = L::fmadd(p, r, L::set1(8.3334519073e-3f));
  p = L::fmadd(p, r, L::set1(4.1665795894e-2f));
  p = L::fmadd(p, r, L::set1(1.6666665459e-1f));
  p = L::fmadd(p, r, L::set1(5.0000001201e-1f));
  p = L::add(L::fmadd(L::mul(p, r), r, r), L::set1(1.f));
  return L::mul(p, L::pow2(n));
}
#endif

void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t g = 0; g < rows; ++g) {
    float* sg = scores + g * len;
    float mx = -std::numeric_limits<float>::infinity();
    int64_t t = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    // the maximum is exact in any order
    Lanes::V vmax = Lanes::set1(mx);
    for (; t + Lanes::n <= len; t += Lanes::n) vmax = Lanes::max(vmax, Lanes::loadf(sg + t));
    alignas(64) float lanes[Lanes::n];
    Lanes::storef(lanes, vmax);
    for (int64_t j = 0; j < Lanes::n; ++j) mx = std::max(mx, lanes[j]);
#endif
    for (; t < len; ++t) mx = std::max(mx, sg[t]);
    float sum = 0.f;
    t = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    const Lanes::V vmx = Lanes::set1(mx);
    Lanes::V vsum = Lanes::zero();
    for (; t + Lanes::n <= len; t += Lanes::n) {
      const Lanes::V e = exp_nonpositive(Lanes::sub(Lanes::loadf(sg + t), vmx));
      Lanes::storef(sg + t, e);
      vsum = Lanes::add(vsum, e);
    }
    sum = Lanes::sum(vsum);
#endif
    for (; t < len; ++t) {
      sg[t] = exp_nonpositive(sg[t] - mx);
      sum += sg[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
  }
}

#ifdef __AVX512F__
// 16 consecutive elements as floats
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <> inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <> inline __m512 load16<int8_t>(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// store 16 floats in the dtype, rounding to nearest even; round16 = store and reload
template <typename T> inline void store16(T* p, __m512 x);
template <> inline void store16<float>(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline __m512i bf16_rounded_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
}
template <> inline void store16<at::BFloat16>(at::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_rounded_bits(x)));
}
template <typename T> inline __m512 round16(__m512 x) { return x; }
template <> inline __m512 round16<at::BFloat16>(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rounded_bits(x), 16));
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// 8 consecutive elements as floats (the AVX2 build's load16)
template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <> inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 load8<int8_t>(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// Lanes::n consecutive cache elements as floats
template <typename T> inline Lanes::V load_lanes(const T* p) {
#ifdef __AVX512F__
  return load16<T>(p);
#else
  return load8<T>(p);
#endif
}
// head_dim <= 256, 16 query heads per KV head
constexpr int64_t kMaxChunks = 256 / Lanes::n, kMaxGroup = 16;

// The lane sums of Lanes::n vectors at once: lane j of the result is the sum of v[j]'s lanes.
// A transpose-reduce (pairs of vectors interleaved and added, halving the count each round)
// takes ~3 operations per vector where a horizontal sum of each takes ~8. Each lane's
// additions are the same whatever the other vectors hold.
inline Lanes::V lane_sums(const Lanes::V* v) {
  // rounds 1 and 2 work within 128-bit lanes: afterwards position p of each 128-bit lane of x[i]
  // holds the sum of v[4i + p]'s four elements in that lane; the rest adds the 128-bit lanes
#ifdef __AVX512F__
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // 128-bit lanes (0, 2) + (1, 3) of two vectors: keys 0-7 and 8-15 as pairs of half sums
  constexpr int even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], even), _mm512_shuffle_f32x4(x[0], x[1], odd));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], even), _mm512_shuffle_f32x4(x[2], x[3], odd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, even), _mm512_shuffle_f32x4(y0, y1, odd));
#else
  __m256 w[4], x[2];
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d a = _mm256_castps_pd(w[2 * i]), b = _mm256_castps_pd(w[2 * i + 1]);
    x[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(x[0], x[1], 0x20), _mm256_permute2f128_ps(x[0], x[1], 0x31));
#endif
}

// One (request, KV head) on vectors of Lanes::n floats. G (query heads per KV head) and C
// (head_dim / Lanes::n) are compile-time for the common shapes, so the query and accumulator
// vectors stay in registers (with runtime sizes they live on the stack and every FMA
// loads and stores: ~2x slower); G = C = 0 takes the sizes at run time.
template <typename T, int G, int C, typename KRows, typename VRows>
void attend_vector_fixed(int64_t group_rt, int64_t chunks_rt, const float* qf, float* scores, int64_t len,
                         float* acc, const KRows& k_rows, const VRows& v_rows) {
  // T is the cache's element type; k_rows/v_rows give each row with its scale (1 unless int8)
  using L = Lanes;
  const int64_t group = G ? G : group_rt, chunks = C ? C : chunks_rt;
  typename L::V qv[G ? G * C : kMaxGroup * kMaxChunks];
  for (int64_t i = 0; i < group * chunks; ++i) qv[i] = L::loadf(qf + i * L::n);
  // each key's partial products per head wait in `partial` until Lanes::n keys are there (or
  // the context ends, the rest zeros): one lane_sums then gives their scores
  typename L::V partial[(G ? G : kMaxGroup) * L::n];
  alignas(64) float row_scales[L::n];
  int64_t pending = 0;
  auto flush = [&](int64_t first) {
    for (int64_t j = pending; j < L::n; ++j) {
      row_scales[j] = 0.f;
      for (int64_t g = 0; g < group; ++g) partial[g * L::n + j] = L::zero();
    }
    const typename L::V rs = L::loadf(row_scales);
    for (int64_t g = 0; g < group; ++g) {
      alignas(64) float sums[L::n];
      L::storef(sums, L::mul(lane_sums(partial + g * L::n), rs));
      std::memcpy(scores + g * len + first, sums, pending * sizeof(float));
    }
    pending = 0;
  };
  k_rows([&](int64_t t, const T* kp, float row_scale) {
    typename L::V kf[C ? C : kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) kf[c] = load_lanes<T>(kp + c * L::n);
    for (int64_t g = 0; g < group; ++g) {
      typename L::V s = L::mul(qv[g * chunks], kf[0]);
      for (int64_t c = 1; c < chunks; ++c) s = L::fmadd(qv[g * chunks + c], kf[c], s);
      partial[g * L::n + pending] = s;
    }
    row_scales[pending] = row_scale;
    if (++pending == L::n) flush(t + 1 - L::n);
  });
  if (pending) flush(len - pending);
  softmax_rows(scores, group, len);
  typename L::V av[G ? G * C : kMaxGroup * kMaxChunks];
  for (int64_t i = 0; i < group * chunks; ++i) av[i] = L::zero();
  v_rows([&](int64_t t, const T* vp, float row_scale) {
    typename L::V vf[C ? C : kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) vf[c] = load_lanes<T>(vp + c * L::n);
    for (int64_t g = 0; g < group; ++g) {
      const typename L::V p = L::set1(scores[g * len + t] * row_scale);
      for (int64_t c = 0; c < chunks; ++c) av[g * chunks + c] = L::fmadd(p, vf[c], av[g * chunks + c]);
    }
  });
  for (int64_t i = 0; i < group * chunks; ++i) L::storef(acc + i * L::n, av[i]);
}

template <typename T, typename KRows, typename VRows>
void attend_vector(int64_t group, int64_t chunks, const float* qf, float* scores, int64_t len, float* acc,
                   const KRows& k_rows, const VRows& v_rows) {
  constexpr int c64 = 64 / Lanes::n, c128 = 128 / Lanes::n;
#define INFERD_ATTEND(g, c)                                                                   \
  if (group == g && chunks == c)                                                            \
    return attend_vector_fixed<T, g, c>(group, chunks, qf, scores, len, acc, k_rows, v_rows);
  // head_dim 64 and 128 with 1 to 8 query heads per KV head cover the Llama family
  INFERD_ATTEND(1, c64) INFERD_ATTEND(2, c64) INFERD_ATTEND(3, c64) INFERD_ATTEND(4, c64)
  INFERD_ATTEND(5, c64) INFERD_ATTEND(6, c64) INFERD_ATTEND(7, c64) INFERD_ATTEND(8, c64)
  INFERD_ATTEND(1, c128) INFERD_ATTEND(2, c128) INFERD_ATTEND(3, c128) INFERD_ATTEND(4, c128)
  INFERD_ATTEND(5, c128) INFERD_ATTEND(6, c128) INFERD_ATTEND(7, c128) INFERD_ATTEND(8, c128)
#undef INFERD_ATTEND
  attend_vector_fixed<T, 0, 0>(group, chunks, qf, scores, len, acc, k_rows, v_rows);
}
#endif


// ---- SiLU(gate) * up ------------------------------------------------------------
// torch: silu(gate) * up, each op rounded to dtype; gate_up is [rows, 2 * inter]

template <typename T>
void silu_and_mul_impl(torch::Tensor& out, const torch::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up.data_ptr<T>() + r * gate_up.stride(0);
      const T* u = g + inter;
      T* o = out.data_ptr<T>() + r * out.stride(0);
      int64_t c = 0;
#ifdef __AVX512F__
      if constexpr (!std::is_same_v<T, at::Half>) {
        for (; c + 16 <= inter; c += 16) {
          const __m512 x = load16<T>(g + c);
          // x * sigmoid(x) with e = exp(-|x|), so the exponent is never positive
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
          const __m512 num = _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x, e);
          const __m512 silu = round16<T>(_mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
          store16<T>(o + c, _mm512_mul_ps(silu, load16<T>(u + c)));
        }
      }
#endif
      for (; c < inter; ++c) {
        const float x = Num<T>::load(g + c);
        const float s = Num<T>::round(x / (1.f + std::exp(-x)));  // as torch: x * sigmoid(x)
        Num<T>::store(o + c, s * Num<T>::load(u + c));
      }
    }
  });
}

void silu_and_mul(torch::Tensor out, torch::Tensor gate_up) {
  check_cpu(gate_up, "gate_up");
  check_cpu(out, "out");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && out.size(0) == gate_up.size(0)
                  && out.size(1) == gate_up.size(1) / 2,
              "silu_and_mul: gate_up must be [rows, 2 * n] and out [rows, n]");
  dispatch(gate_up.scalar_type(), "silu_and_mul", [&](auto tag) {
    using scalar_t = decltype(tag); silu_and_mul_impl<scalar_t>(out, gate_up); });
}

// One query token per request. Query heads sharing a KV head are handled together,
// so each cached key and value row is read once per (request, KV head).
template <typename T, typename C>
void decode_attention_impl(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                           const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                           const torch::Tensor& seq_lens, const torch::Tensor& q_rows, double scale,
                           const float* k_scales, const float* v_scales) {
  // T: the queries' and output's dtype; C: the cache's (T, or int8 with per-row scales)
  const int64_t batch = block_tables.size(0);
  const int64_t n_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), n_kv = k_cache.size(2);
  const int64_t group = n_heads / n_kv;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* rows = q_rows.data_ptr<int64_t>();
  const C* kc = k_cache.data_ptr<C>();
  const C* vc = v_cache.data_ptr<C>();
  const T* qbase = q.data_ptr<T>();
  T* obase = out.data_ptr<T>();
  const int64_t q_row_stride = q.stride(0), q_head_stride = q.stride(1), out_stride = out.stride(0);
  const int64_t token_stride = n_kv * dim, block_stride = block_size * token_stride;
#ifdef __AVX512F__
  constexpr int64_t lanes = 16;
  const bool vector = dim % 16 == 0 && dim / 16 <= kMaxChunks && group <= kMaxGroup;
#elif defined(__AVX2__)
  constexpr int64_t lanes = 8;
  const bool vector = dim % 8 == 0 && dim / 8 <= kMaxChunks && group <= kMaxGroup;
#else
  const bool vector = false;
#endif

  // The rows go to the threads in the order 0, last, 1, last - 1, ...: each thread takes a
  // contiguous range of items, and a prompt chunk's tokens attend to ever longer prefixes, so
  // in row order the thread with the chunk's second half had ~3x the work of the first.
  auto row_of = [batch](int64_t j) { return j % 2 ? batch - 1 - j / 2 : j / 2; };
  at::parallel_for(0, batch * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), kv(dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = row_of(item / n_kv), h = item % n_kv;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * table_stride;
      const T* qp = qbase + rows[b] * q_row_stride;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          qf[g * dim + d] = Num<T>::load(qp + (h * group + g) * q_head_stride + d) * float(scale);
      scores.resize(group * len);
      // calls f(t, row, row_scale) for each context token, walking the block table (no division
      // per token); row_scale is the int8 row's scale, 1 for a float cache (an exact no-op)
      auto for_each_row = [&](const C* cache, const float* row_scales, auto&& f) {
        for (int64_t start = 0, i = 0; start < len; start += block_size, ++i) {
          const C* row = cache + table[i] * block_stride + h * dim;
          const float* rs = row_scales ? row_scales + table[i] * block_size * n_kv + h : nullptr;
          const int64_t n = std::min(block_size, len - start);
          for (int64_t j = 0; j < n; ++j, row += token_stride) f(start + j, row, rs ? rs[j * n_kv] : 1.f);
        }
      };
      auto k_rows = [&](auto&& f) { for_each_row(kc, k_scales, f); };
      auto v_rows = [&](auto&& f) { for_each_row(vc, v_scales, f); };
      T* op = obase + rows[b] * out_stride + h * group * dim;
#if defined(__AVX512F__) || defined(__AVX2__)
      if (vector) {
        attend_vector<C>(group, dim / lanes, qf.data(), scores.data(), len, acc.data(), k_rows, v_rows);
        for (int64_t i = 0; i < group * dim; ++i) Num<T>::store(op + i, acc[i]);
        continue;
      }
#endif
      k_rows([&](int64_t t, const C* kp, float row_scale) {
        for (int64_t d = 0; d < dim; ++d) kv[d] = Num<C>::load(kp + d);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * kv[d];
          scores[g * len + t] = s * row_scale;
        }
      });
      softmax_rows(scores.data(), group, len);
      std::fill(acc.begin(), acc.end(), 0.f);
      v_rows([&](int64_t t, const C* vp, float row_scale) {
        for (int64_t d = 0; d < dim; ++d) kv[d] = Num<C>::load(vp + d);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t] * row_scale;
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * kv[d];
        }
      });
      for (int64_t i = 0; i < group * dim; ++i) Num<T>::store(op + i, acc[i]);
    }
  });
}

void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor q_rows,
                      double scale, c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales) {
  check_cpu(q, "q");
  check_cpu(out, "out");
  TORCH_CHECK(q.dim() == 3 && out.dim() == 2 && out.size(1) == q.size(1) * q.size(2),
              "decode_attention: q must be [tokens, heads, dim] and out [tokens, heads * dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4
                  && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2)
                  && q.size(1) % k_cache.size(2) == 0,
              "decode_attention: caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type()
                  && (quantized || q.scalar_type() == k_cache.scalar_type()),
              "decode_attention: dtype mismatch");
  TORCH_CHECK(quantized == (k_scales.has_value() && v_scales.has_value()),
              "decode_attention: an int8 cache needs its scales, and only an int8 cache has them");
  if (quantized)
    for (auto* s : {&*k_scales, &*v_scales})
      TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous()
                      && s->numel() == k_cache.numel() / k_cache.size(3),
                  "decode_attention: scales must be fp32 [blocks, block_size, kv_heads]");
  for (auto* t : {&block_tables, &seq_lens, &q_rows})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->stride(-1) == 1, "decode_attention: indices must be int64");
  TORCH_CHECK(seq_lens.numel() == block_tables.size(0) && q_rows.numel() == block_tables.size(0),
              "decode_attention: one table, length and query row per request");
  const int64_t batch = block_tables.size(0), block_size = k_cache.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* rows = q_rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= block_tables.size(1) * block_size,
                "decode_attention: sequence length beyond its block table");
    TORCH_CHECK(rows[b] >= 0 && rows[b] < q.size(0) && rows[b] < out.size(0), "decode_attention: bad query row");
    const int64_t* table = block_tables.data_ptr<int64_t>() + b * block_tables.stride(0);
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(table[i] >= 0 && table[i] < k_cache.size(0), "decode_attention: block id out of range");
  }
  const float* ks = quantized ? k_scales->data_ptr<float>() : nullptr;
  const float* vs = quantized ? v_scales->data_ptr<float>() : nullptr;
  dispatch(q.scalar_type(), "decode_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (quantized)
      decode_attention_impl<scalar_t, int8_t>(out, q, k_cache, v_cache, block_tables, seq_lens, q_rows, scale, ks, vs);
    else
      decode_attention_impl<scalar_t, scalar_t>(out, q, k_cache, v_cache, block_tables, seq_lens, q_rows, scale,
                                                ks, vs);
  });
}

}  // namespace inferd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace inferd;
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after adding x into residual (in place)");
  m.def("silu_and_mul", &silu_and_mul, "SiLU(gate) * up");
  m.def("rope", &rope, "rotate-half rotary embedding, in place on q and k");
  m.def("write_kv", &write_kv, "write new tokens' K/V into their cache slots (int8 caches: quantized)",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("slots"),
        py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none());
  m.def("decode_attention", &decode_attention, "one-token queries against the paged cache",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("q_rows"), py::arg("scale"), py::arg("k_scales") = py::none(),
        py::arg("v_scales") = py::none());
  m.def("quant_matmul", &quant_matmul, "x @ W.T for W in packed GGUF blocks (quant_matmul.cpp)",
        py::arg("x"), py::arg("packed"), py::arg("d"), py::arg("m"), py::arg("out_features"),
        py::arg("reference") = false, py::arg("terms") = 2);
  m.def("quant_matmul_path", &quant_matmul_path, "the instruction set quant_matmul was built for");
  m.def("decode_layers", &decode_layers, "every decoder layer of a decode-only step (decode_layers.cpp)");
}
