// Matmul against a GGUF file's own quantized blocks (layers/quant_blocks.py packs them).
//
// y[m, n] = sum over 32-element blocks b of  dw[n,b] * (qw[n,b] . x[m,b])  (+ mw[n,b] * sum x[m,b])
//
// As llama.cpp does, the activations are quantized too, per row and block of 32, to
// int8 with an fp32 scale (da = absmax / 127), so each block's dot product is an exact
// int32 sum of int8 x 4-bit (or 8-bit) products. Unlike llama.cpp, by default a second
// int8 term carries what the first left over (x ~ d1 q1 + d2 q2 with d2 = d1 / 256, about
// 15 bits of the activation instead of 8, one int32 sum per block: see QuantRows): one int8 term moved SmolLM2's perplexity by 0.56%, two by
// a few hundredths (docs/benchmarks.md). The products are taken with the CPU's
// integer dot product instructions: AMX tiles for 16 rows at a time where the CPU and
// the OS allow them, AVX-512 VNNI (vpdpbusd), else AVX-512 BW or AVX2 (vpmaddubsw),
// else plain C++. The -march the module is built with picks one (layers/cpu_isa.py).
//
// Batch invariance: every output is accumulated block by block, in block order, with
// the same fp32 operations (no fused multiply-add, -ffp-contract=off), whichever row
// tile, thread or instruction set computes it. A request's logits are therefore the
// same bits alone and in any batch, and the AVX2, AVX-512 and scalar builds agree
// bit for bit (tests/layers/test_quant_matmul.py checks both).
//
// Packed layout, per group of 16 output columns and block of 32 inputs:
//   4-bit (Q4_0, Q4_1): 256 bytes; for p in 0..3, 64 bytes = 16 columns x 4 bytes,
//     byte [p][c][j]: low nibble = element 8p + j, high nibble = element 8p + 4 + j.
//   8-bit (Q8_0): 512 bytes; for chunk ch in 0..7, byte [ch][c][j] = q(4ch + j) + 128.
// Each 64-byte row is what one vpdpbusd multiplies against 4 broadcast activations.
// Scales d (and Q4_1's minimum m) are the file's f16 values, [group][block][16 columns],
// widened to fp32 exactly when read. Q4_0 stores q - 8 as q, Q8_0 q as q + 128; the
// offset comes back out of the integer sum exactly (offset * sum of the activations).

#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace inferd {
namespace {

constexpr int kBlock = 32;
constexpr int kCols = 16;
constexpr int kAhead = 4096;  // bytes of packed weights prefetched ahead of the one being read

enum class Kind { Q4_0, Q4_1, Q8_0 };

// The activations, quantized per row and block. With two terms, x ~ d1 q1 + d2 q2 where
// d2 = d1 / 256 exactly, so x ~ d2 (256 q1 + q2): a block's sum against the weights is one
// int32, 256 * (w . q1) + (w . q2), and everything after it is as with one term.
struct QuantRows {
  std::vector<int8_t> q;    // [rows, terms, K]: each term's levels (a row's terms are adjacent)
  std::vector<float> d;     // [rows, blocks] scale of the combined levels (d1, or d1 / 256)
  std::vector<int32_t> s;   // [rows, blocks] sum of the combined levels
  std::vector<float> ds;    // [rows, blocks] d * s (Q4_1's minimum term)
  int64_t k = 0, blocks = 0;
  int terms = 1;
};

constexpr int kTermShift = 8;  // the second term's levels count 1/256 of the first's

// exact: every f16 is an fp32
inline float f16_to_f32(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

template <typename T>
inline float load_float(const T* p) {
  return float(*p);
}

// One block of 32 activations to int8 levels, every term: d = absmax / 127, then per term
// q = round(x * inv) (to nearest even, as the vector conversion does) clamped to +-127, and
// x becomes what q leaves over (x - d * q) for the next term, whose levels count 1/256 (the
// scaling by 2^8 is exact). The term levels go to q, q + term_stride; `d` is the last term's
// scale and the return value the sum of the combined levels, 256 q1 + q2 with two terms.
// The vector versions keep the block in registers and do the same IEEE operations.
#if defined(__AVX512F__)
template <typename T> inline __m512 load_block16(const T* p);
template <> inline __m512 load_block16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load_block16<at::BFloat16>(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename T>
inline int32_t quantize_block(const T* src, int8_t* q, int64_t term_stride, int terms, float& d) {
  __m512 x0 = load_block16(src), x1 = load_block16(src + 16);
  const __m512 amax = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1));
  d = _mm512_reduce_max_ps(amax) / 127.f;
  float inv = d > 0.f ? 1.f / d : 0.f;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512i total = _mm512_setzero_si512();
  for (int term = 0; term < terms; ++term) {
    if (term) {
      d = d / float(1 << kTermShift);
      inv = inv * float(1 << kTermShift);
    }
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i n0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x0, vinv))));
    const __m512i n1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x1, vinv))));
    int8_t* qt = q + term * term_stride;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qt), _mm512_cvtepi32_epi8(n0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qt + 16), _mm512_cvtepi32_epi8(n1));
    total = _mm512_add_epi32(_mm512_slli_epi32(total, kTermShift), _mm512_add_epi32(n0, n1));
    if (term + 1 < terms) {
      const __m512 vd = _mm512_set1_ps(d);
      x0 = _mm512_sub_ps(x0, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(n0)));
      x1 = _mm512_sub_ps(x1, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(n1)));
    }
  }
  return _mm512_reduce_add_epi32(total);
}
#elif defined(__AVX2__)
template <typename T> inline __m256 load_block8(const T* p);
template <> inline __m256 load_block8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load_block8<at::BFloat16>(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

template <typename T>
inline int32_t quantize_block(const T* src, int8_t* q, int64_t term_stride, int terms, float& d) {
  __m256 x[4];
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = load_block8(src + 8 * i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, x[i]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  d = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1))) / 127.f;
  float inv = d > 0.f ? 1.f / d : 0.f;
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i total = _mm256_setzero_si256();
  for (int term = 0; term < terms; ++term) {
    if (term) {
      d = d / float(1 << kTermShift);
      inv = inv * float(1 << kTermShift);
    }
    const __m256 vinv = _mm256_set1_ps(inv), vd = _mm256_set1_ps(d);
    __m256i n[4];
    for (int i = 0; i < 4; ++i)
      n[i] = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(x[i], vinv))));
    // int32 -> int8 in element order: the packs interleave 128-bit lanes, the permute undoes it
    const __m256i n8 = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(n8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + term * term_stride), ordered);
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    total = _mm256_add_epi32(_mm256_slli_epi32(total, kTermShift), sum);
    if (term + 1 < terms)
      for (int i = 0; i < 4; ++i) x[i] = _mm256_sub_ps(x[i], _mm256_mul_ps(vd, _mm256_cvtepi32_ps(n[i])));
  }
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
  return _mm_cvtsi128_si32(t4);
}
#else
template <typename T>
inline int32_t quantize_block(const T* src, int8_t* q, int64_t term_stride, int terms, float& d) {
  float x[kBlock];
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) {
    x[i] = load_float(src + i);
    amax = std::max(amax, std::fabs(x[i]));
  }
  d = amax / 127.f;
  float inv = d > 0.f ? 1.f / d : 0.f;
  int32_t total = 0;
  for (int term = 0; term < terms; ++term) {
    if (term) {
      d = d / float(1 << kTermShift);
      inv = inv * float(1 << kTermShift);
    }
    int8_t* qt = q + term * term_stride;
    int32_t sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int v = int(std::nearbyint(x[i] * inv));
      qt[i] = int8_t(std::min(127, std::max(-127, v)));
      sum += qt[i];
      x[i] = x[i] - d * float(qt[i]);
    }
    total = total * (1 << kTermShift) + sum;
  }
  return total;
}
#endif

constexpr int64_t kAheadBlocks = 16;

template <typename T>
void quantize_rows(QuantRows& out, const T* x, int64_t rows, int64_t k, int64_t stride, int terms) {
  out.k = k;
  out.blocks = k / kBlock;
  out.terms = terms;
  // only ever grown: the memory stays with the calling thread between calls (see quant_matmul)
  auto grow = [](auto& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(n); };
  grow(out.q, rows * terms * k);
  grow(out.d, rows * out.blocks);
  grow(out.s, rows * out.blocks);
  grow(out.ds, rows * out.blocks);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int8_t* q = out.q.data() + r * terms * k;
      for (int64_t b = 0; b < out.blocks; ++b) {
        const int64_t at = r * out.blocks + b;
        // the levels were last read by every thread (the matmul after the previous call):
        // ask for the lines' ownership ahead, or each store waits for the others' copies to go
        for (int term = 0; term < terms; ++term) __builtin_prefetch(q + term * k + (b + kAheadBlocks) * kBlock, 1);
        if ((b & 15) == 0) {
          __builtin_prefetch(out.d.data() + at + 16, 1);
          __builtin_prefetch(out.s.data() + at + 16, 1);
          __builtin_prefetch(out.ds.data() + at + 16, 1);
        }
        float d;
        const int32_t sum = quantize_block(x + r * stride + b * kBlock, q + b * kBlock, k, terms, d);
        out.d[at] = d;
        out.s[at] = sum;
        out.ds[at] = d * float(sum);
      }
    }
  });
}

// The integer offset a kind stores its levels with (see the layout above).
template <Kind kind>
constexpr int32_t level_offset() {
  return kind == Kind::Q4_0 ? 8 : kind == Kind::Q8_0 ? 128 : 0;
}

template <Kind kind>
constexpr int64_t block_bytes() {
  return kind == Kind::Q8_0 ? 512 : 256;
}

// Arguments of one tile: a group of 16 columns against consecutive rows from row0.
struct Tile {
  const uint8_t* w;      // the group's packed blocks
  const uint16_t* d;     // [blocks][16]
  const uint16_t* m;     // [blocks][16] or null
  const QuantRows* a;
  int64_t row0;
  float* out;            // row row0's output, at the group's first column
  int64_t out_stride;
  // term j of row r's levels for block b
  const int8_t* levels(int64_t r, int j, int64_t b) const {
    return a->q.data() + ((row0 + r) * a->terms + j) * a->k + b * kBlock;
  }
};

// ---- plain C++: the reference every vector path matches bit for bit ------------

template <Kind kind>
void tile_scalar(const Tile& t, int rows) {
  const int64_t nb = t.a->blocks;
  for (int r = 0; r < rows; ++r) {
    float acc[kCols] = {0};
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* w = t.w + b * block_bytes<kind>();
      const int64_t at = (t.row0 + r) * nb + b;
      const float da = t.a->d[at];
      for (int c = 0; c < kCols; ++c) {
        int32_t sum = 0;
        for (int j = 0; j < t.a->terms; ++j) {
          const int8_t* q = t.levels(r, j, b);
          int32_t part = 0;
          for (int e = 0; e < kBlock; ++e) {
            int level;
            if (kind == Kind::Q8_0) {
              level = w[(e / 4) * 64 + c * 4 + e % 4];
            } else {
              const uint8_t byte = w[(e / 8) * 64 + c * 4 + e % 4];
              level = (e % 8) < 4 ? (byte & 0x0f) : (byte >> 4);
            }
            part += level * q[e];
          }
          sum = j ? sum * (1 << kTermShift) + part : part;
        }
        sum -= level_offset<kind>() * t.a->s[at];
        const float dd = f16_to_f32(t.d[b * kCols + c]) * da;
        acc[c] = acc[c] + dd * float(sum);
        if (kind == Kind::Q4_1) acc[c] = acc[c] + f16_to_f32(t.m[b * kCols + c]) * t.a->ds[at];
      }
    }
    std::memcpy(t.out + r * t.out_stride, acc, sizeof(acc));
  }
}

#if defined(__AVX2__) || defined(__AVX512F__)
// The weights stream through once per step: ask for them well ahead (measured: without
// this a core read them at about half the rate a plain sum over memory reaches).
template <Kind kind>
inline void prefetch_ahead(const Tile& t, int64_t b) {
  const char* w = reinterpret_cast<const char*>(t.w + b * block_bytes<kind>() + kAhead);
  for (int line = 0; line < block_bytes<kind>(); line += 64) _mm_prefetch(w + line, _MM_HINT_T0);
  const int64_t ahead = (b + kAhead / block_bytes<kind>()) * kCols;
  _mm_prefetch(reinterpret_cast<const char*>(t.d + ahead), _MM_HINT_T0);
  if (kind == Kind::Q4_1) _mm_prefetch(reinterpret_cast<const char*>(t.m + ahead), _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- AVX-512: 16 columns per vector -------------------------------------------

// int32 sums of 4 adjacent u8 x s8 products per lane
inline __m512i dot4(__m512i acc, __m512i w, __m512i a) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, w, a);
#else
  const __m512i pairs = _mm512_maddubs_epi16(w, a);  // 2 x 255 x 127 fits int16 only for 4-bit w
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#endif
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __m512 scales16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A row's block sum from its terms' sums: 256 * first + second
template <int T>
inline __m512i combine(const __m512i* sums) {
  return T == 2 ? _mm512_add_epi32(_mm512_slli_epi32(sums[0], kTermShift), sums[1]) : sums[0];
}

// One block's contribution to a row's 16 outputs, the same fp32 operations as tile_scalar:
// acc + (dw * da) * sum (+ mw * (da * sum of the activations) for Q4_1). `offset_in_sum`: the
// integer sum still holds the levels' storage offset, taken out here exactly.
template <Kind kind, bool offset_in_sum>
inline __m512 add_block(__m512 acc, __m512i sum, __m512 dw, __m512 mw, const QuantRows& a, int64_t at) {
  if (offset_in_sum && level_offset<kind>())
    sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(level_offset<kind>() * a.s[at]));
  const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(a.d[at]));
  acc = _mm512_add_ps(acc, _mm512_mul_ps(dd, _mm512_cvtepi32_ps(sum)));
  if (kind == Kind::Q4_1) acc = _mm512_add_ps(acc, _mm512_mul_ps(mw, _mm512_set1_ps(a.ds[at])));
  return acc;
}

// R rows of T terms each: R * T streams of levels against the same unpacked weights
template <Kind kind, int R, int T>
void tile_avx512(const Tile& t) {
  constexpr int V = R * T;
  const int64_t nb = t.a->blocks;
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = t.w + b * block_bytes<kind>();
    prefetch_ahead<kind>(t, b);
    // two chains of dot products per stream rather than one: each waits on the last's latency
    __m512i sum[V], odd[V];
    for (int v = 0; v < V; ++v) sum[v] = odd[v] = _mm512_setzero_si512();
    if (kind == Kind::Q8_0) {
      for (int ch = 0; ch < 8; ++ch) {
        __m512i wv = _mm512_loadu_si512(w + ch * 64);
#ifndef __AVX512VNNI__
        // maddubs would saturate at 255 x 127 x 2: take |w - 128| and move the sign onto a
        wv = _mm512_xor_si512(wv, _mm512_set1_epi8(char(0x80)));
        const __m512i aw = _mm512_abs_epi8(wv);
        const __mmask64 neg = _mm512_movepi8_mask(wv);
#endif
        for (int v = 0; v < V; ++v) {
          const int8_t* q = t.levels(v / T, v % T, b) + ch * 4;
          __m512i& into = ch % 2 ? odd[v] : sum[v];
#ifdef __AVX512VNNI__
          into = dot4(into, wv, bcast4(q));
#else
          const __m512i a = bcast4(q);
          into = dot4(into, aw, _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a));
#endif
        }
      }
    } else {
      for (int p = 0; p < 4; ++p) {
        const __m512i v4 = _mm512_loadu_si512(w + p * 64);
        const __m512i lo = _mm512_and_si512(v4, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v4, 4), low);
        for (int v = 0; v < V; ++v) {
          const int8_t* q = t.levels(v / T, v % T, b) + p * 8;
          sum[v] = dot4(sum[v], lo, bcast4(q));
          odd[v] = dot4(odd[v], hi, bcast4(q + 4));
        }
      }
    }
    for (int v = 0; v < V; ++v) sum[v] = _mm512_add_epi32(sum[v], odd[v]);
    const __m512 dw = scales16(t.d + b * kCols), mw = kind == Kind::Q4_1 ? scales16(t.m + b * kCols) : dw;
#ifdef __AVX512VNNI__
    constexpr bool offset_in_sum = true;
#else
    constexpr bool offset_in_sum = kind != Kind::Q8_0;  // maddubs took Q8_0's levels signed
#endif
    for (int r = 0; r < R; ++r)
      acc[r] = add_block<kind, offset_in_sum>(acc[r], combine<T>(sum + r * T), dw, mw, *t.a, (t.row0 + r) * nb + b);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(t.out + r * t.out_stride, acc[r]);
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__)
// ---- AMX: 16 level streams x 16 columns x one block per tile multiply -----------
//
// The packed weights are already in AMX's B layout (rows of 16 columns x 4 inputs); the
// 4-bit ones are widened to bytes first. Each block's int32 sums come out exact, as on
// every other path, and go through the same combine and add_block, so the bits do not change.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

// Linux hands out AMX state only to a process that asks (arch_prctl); once per process.
// INFERD_AMX=0 keeps to the AVX-512 path (the same bits; for comparisons).
bool amx_usable() {
  static const bool ok = [] {
    const char* env = std::getenv("INFERD_AMX");
    if (env && std::string(env) == "0") return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

void configure_tiles() {
  TileConfig c;
  for (int i : {0, 1}) c.rows[i] = 16, c.colsb[i] = 64;   // C: 16 streams x 16 int32
  for (int i : {2, 3}) c.rows[i] = 16, c.colsb[i] = 32;   // A: 16 streams x 32 int8 levels
  for (int i : {4, 5}) c.rows[i] = 8, c.colsb[i] = 64;    // B: 8 rows of 16 columns x 4 levels
  // GCC does not see ldtilecfg read the struct and drops the stores above without this
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

constexpr int kAmxStreams = 16;

template <Kind kind>
inline const uint8_t* b_tile(const uint8_t* w, uint8_t* buf) {
  if (kind == Kind::Q8_0) return w;
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int p = 0; p < 4; ++p) {
    const __m512i v = _mm512_loadu_si512(w + p * 64);
    _mm512_store_si512(buf + 2 * p * 64, _mm512_and_si512(v, low));
    _mm512_store_si512(buf + (2 * p + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
  return buf;
}

// 16 / T rows: their 16 level streams are consecutive in QuantRows.q, one A tile
template <Kind kind, int T>
void tile_amx(const Tile& t) {
  constexpr int R = kAmxStreams / T;
  const int64_t nb = t.a->blocks, k = t.a->k;
  alignas(64) uint8_t wbuf[2][512];
  alignas(64) int32_t sums[2][kAmxStreams * kCols];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int8_t* a = t.levels(0, 0, 0);
  for (int64_t b = 0; b < nb; b += 2) {
    // two blocks in flight (tiles 0/2/4 and 1/3/5), then their sums in block order
    const bool pair = b + 1 < nb;
    const uint8_t* w = t.w + b * block_bytes<kind>();
    prefetch_ahead<kind>(t, b);
    _tile_loadd(4, b_tile<kind>(w, wbuf[0]), 64);
    _tile_loadd(2, a + b * kBlock, k);
    _tile_zero(0);
    _tile_dpbsud(0, 2, 4);
    if (pair) {
      _tile_loadd(5, b_tile<kind>(w + block_bytes<kind>(), wbuf[1]), 64);
      _tile_loadd(3, a + (b + 1) * kBlock, k);
      _tile_zero(1);
      _tile_dpbsud(1, 3, 5);
    }
    _tile_stored(0, sums[0], 64);
    if (pair) _tile_stored(1, sums[1], 64);
    for (int64_t j = 0; j < (pair ? 2 : 1); ++j) {
      const int64_t bj = b + j;
      const __m512 dw = scales16(t.d + bj * kCols), mw = kind == Kind::Q4_1 ? scales16(t.m + bj * kCols) : dw;
      for (int r = 0; r < R; ++r) {
        __m512i s[T];
        for (int i = 0; i < T; ++i) s[i] = _mm512_load_si512(sums[j] + (r * T + i) * kCols);
        acc[r] = add_block<kind, true>(acc[r], combine<T>(s), dw, mw, *t.a, (t.row0 + r) * nb + bj);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(t.out + r * t.out_stride, acc[r]);
}
#define INFERD_AMX 1
#endif

// level streams (rows x terms) per tile
template <Kind kind>
constexpr int max_streams() { return 8; }
template <Kind kind, int T>
void tile(const Tile& t, int rows) {
  switch (rows) {
    case 8: if constexpr (T == 1) return tile_avx512<kind, 8, T>(t); break;
    case 7: if constexpr (T == 1) return tile_avx512<kind, 7, T>(t); break;
    case 6: if constexpr (T == 1) return tile_avx512<kind, 6, T>(t); break;
    case 5: if constexpr (T == 1) return tile_avx512<kind, 5, T>(t); break;
    case 4: return tile_avx512<kind, 4, T>(t);
    case 3: return tile_avx512<kind, 3, T>(t);
    case 2: return tile_avx512<kind, 2, T>(t);
    default: return tile_avx512<kind, 1, T>(t);
  }
  TORCH_CHECK(false, "quant_matmul: a tile of ", rows, " rows");
}
#ifdef INFERD_AMX
constexpr const char* kPath = "amx";
#else
constexpr const char* kPath = "avx512";
#endif

#elif defined(__AVX2__)
// ---- AVX2: the 16 columns as two halves of 8 ---------------------------------

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int T>
inline __m256i combine(const __m256i* sums) {
  return T == 2 ? _mm256_add_epi32(_mm256_slli_epi32(sums[0], kTermShift), sums[1]) : sums[0];
}

// Q8_0 (the output head; one row per request at a time): per chunk of 4 inputs and half
template <int R, int T>
void tile_avx2_q8(const Tile& t) {
  constexpr int V = R * T;
  const int64_t nb = t.a->blocks;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = t.w + b * block_bytes<Kind::Q8_0>();
    prefetch_ahead<Kind::Q8_0>(t, b);
    for (int h = 0; h < 2; ++h) {
      __m256i sum[V];
      for (int v = 0; v < V; ++v) sum[v] = _mm256_setzero_si256();
      for (int ch = 0; ch < 8; ++ch) {
        // |w - 128| times a with w's sign: maddubs would saturate on w + 128
        const __m256i wv = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ch * 64 + h * 32)), _mm256_set1_epi8(char(0x80)));
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        for (int v = 0; v < V; ++v) {
          const int8_t* q = t.levels(v / T, v % T, b) + ch * 4;
          const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(q), wv));
          sum[v] = _mm256_add_epi32(sum[v], _mm256_madd_epi16(pairs, ones));
        }
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.d + b * kCols + h * 8)));
      for (int r = 0; r < R; ++r) {
        const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(t.a->d[(t.row0 + r) * nb + b]));
        acc[r][h] = _mm256_add_ps(acc[r][h], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(combine<T>(sum + r * T))));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(t.out + r * t.out_stride, acc[r][0]);
    _mm256_storeu_ps(t.out + r * t.out_stride + 8, acc[r][1]);
  }
}

// 4-bit levels: a half block's weights (8 columns x 32 inputs) are unpacked once into 8
// registers and every level stream of the tile runs against them, one stream at a time.
// Streams wait on nothing but their own short chain of adds, so the live registers are the
// weights plus a few per stream whatever the tile's height (with each stream's partial sums
// held at once, the compiler spilled them to the stack and the loop ran at half speed).
// The fp32 accumulators live in memory: one load and store per row and block.
template <Kind kind, int R, int T>
void tile_avx2_q4(const Tile& t) {
  const int64_t nb = t.a->blocks, k = t.a->k;
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const int8_t* levels = t.levels(0, 0, 0);  // stream v (row v / T, term v % T) at levels + v * k
  alignas(32) float acc[R][kCols] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = t.w + b * block_bytes<kind>();
    prefetch_ahead<kind>(t, b);
    for (int h = 0; h < 2; ++h) {
      __m256i lo[4], hi[4];
      for (int p = 0; p < 4; ++p) {
        const __m256i v4 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 64 + h * 32));
        lo[p] = _mm256_and_si256(v4, low);
        hi[p] = _mm256_and_si256(_mm256_srli_epi16(v4, 4), low);
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.d + b * kCols + h * 8)));
      __m256 mw = dw;
      if (kind == Kind::Q4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.m + b * kCols + h * 8)));
      for (int r = 0; r < R; ++r) {
        __m256i s = _mm256_setzero_si256();
        for (int j = 0; j < T; ++j) {
          const int8_t* q = levels + (r * T + j) * k + b * kBlock;
          // 8 pair sums of at most 2 x 15 x 127 each fit one int16
          __m256i pairs = _mm256_maddubs_epi16(lo[0], bcast4(q));
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(hi[0], bcast4(q + 4)));
          for (int p = 1; p < 4; ++p) {
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(lo[p], bcast4(q + p * 8)));
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(hi[p], bcast4(q + p * 8 + 4)));
          }
          const __m256i part = _mm256_madd_epi16(pairs, ones);
          s = j ? _mm256_add_epi32(_mm256_slli_epi32(s, kTermShift), part) : part;
        }
        const int64_t at = (t.row0 + r) * nb + b;
        if (kind == Kind::Q4_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * t.a->s[at]));
        const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(t.a->d[at]));
        __m256 a = _mm256_add_ps(_mm256_load_ps(acc[r] + h * 8), _mm256_mul_ps(dd, _mm256_cvtepi32_ps(s)));
        if (kind == Kind::Q4_1) a = _mm256_add_ps(a, _mm256_mul_ps(mw, _mm256_set1_ps(t.a->ds[at])));
        _mm256_store_ps(acc[r] + h * 8, a);
      }
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(t.out + r * t.out_stride, acc[r], sizeof(acc[r]));
}

template <Kind kind, int R, int T>
void tile_avx2(const Tile& t) {
  if constexpr (kind == Kind::Q8_0) {
    tile_avx2_q8<R, T>(t);
  } else {
    tile_avx2_q4<kind, R, T>(t);
  }
}

// level streams (rows x terms) per tile: the 4-bit tiles hold a few registers per stream, Q8_0's all its sums
template <Kind kind>
constexpr int max_streams() { return kind == Kind::Q8_0 ? 4 : 8; }

template <Kind kind, int T, int R = max_streams<kind>() / T>
void tile(const Tile& t, int rows) {
  if constexpr (R > 1) {
    if (rows < R) return tile<kind, T, R - 1>(t, rows);
  }
  tile_avx2<kind, R, T>(t);
}
constexpr const char* kPath = "avx2";

#else
template <Kind kind>
constexpr int max_streams() { return 2; }
template <Kind kind, int T>
void tile(const Tile& t, int rows) {
  tile_scalar<kind>(t, rows);
}
constexpr const char* kPath = "scalar";
#endif

template <Kind kind, int T>
void run(const QuantRows& a, int64_t rows, const uint8_t* packed, const uint16_t* d, const uint16_t* m,
         int64_t groups, float* out, int64_t out_stride, bool reference) {
  const int64_t nb = a.blocks;
  constexpr int kTileRows = max_streams<kind>() / T;
  // a thread takes whole column groups and every row for them: the group's weights
  // (a few KiB) stay in L1 while the rows go by. Even one row is split between the
  // threads (streaming the weights from L3 or memory is what a decode step waits on)
  // once each gets ~8 groups of 576 inputs, about a microsecond of work.
  const int64_t grain = std::max<int64_t>(1, 144 / std::max<int64_t>(1, rows * T * nb));
#ifdef INFERD_AMX
  constexpr int kAmxRows = kAmxStreams / T;
  const bool amx = !reference && rows >= kAmxRows && amx_usable();
#endif
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
#ifdef INFERD_AMX
    if (amx) configure_tiles();  // the tile configuration is per thread
#endif
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t r0 = 0; r0 < rows;) {
        Tile t{packed + g * nb * block_bytes<kind>(), d + g * nb * kCols, m ? m + g * nb * kCols : nullptr,
               &a, r0, out + r0 * out_stride + g * kCols, out_stride};
#ifdef INFERD_AMX
        if (amx && rows - r0 >= kAmxRows) {
          tile_amx<kind, T>(t);
          r0 += kAmxRows;
          continue;
        }
#endif
        const int n = int(std::min<int64_t>(kTileRows, rows - r0));
        if (reference) {
          tile_scalar<kind>(t, n);
        } else {
          tile<kind, T>(t, n);
        }
        r0 += n;
      }
    }
#ifdef INFERD_AMX
    if (amx) _tile_release();
#endif
  });
}

template <Kind kind>
void run_terms(const QuantRows& a, int64_t rows, const uint8_t* packed, const uint16_t* d, const uint16_t* m,
               int64_t groups, float* out, int64_t out_stride, bool reference) {
  if (a.terms == 2) {
    run<kind, 2>(a, rows, packed, d, m, groups, out, out_stride, reference);
  } else {
    run<kind, 1>(a, rows, packed, d, m, groups, out, out_stride, reference);
  }
}

}  // namespace

torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor d, torch::Tensor m,
                           int64_t out_features, bool reference, int64_t terms) {
  TORCH_CHECK(terms == 1 || terms == 2, "quant_matmul: terms is 1 or 2");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quant_matmul: x must be [rows, K], contiguous in K");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "quant_matmul: packed must be uint8 [groups, blocks, bytes]");
  const int64_t groups = packed.size(0), nb = packed.size(1), bytes = packed.size(2);
  TORCH_CHECK(bytes == 256 || bytes == 512, "quant_matmul: a packed block is 256 (4-bit) or 512 (8-bit) bytes");
  TORCH_CHECK(x.size(1) == nb * kBlock, "quant_matmul: x has ", x.size(1), " inputs, the weight ", nb * kBlock);
  TORCH_CHECK(d.is_contiguous() && d.scalar_type() == at::kHalf && d.numel() == groups * nb * kCols,
              "quant_matmul: d must be f16 [groups, blocks, 16]");
  const bool has_min = m.numel() > 0;
  TORCH_CHECK(!has_min || (bytes == 256 && m.is_contiguous() && m.scalar_type() == at::kHalf &&
                           m.numel() == d.numel()), "quant_matmul: m must be like d (4-bit weights only)");
  TORCH_CHECK(out_features <= groups * kCols, "quant_matmul: out_features exceeds the packed columns");
  const int64_t rows = x.size(0);
  // a 512-token chunk's levels are about a megabyte: fresh vectors every call cost a memset
  // and page faults, so each calling thread keeps its own
  static thread_local QuantRows a;
  if (x.scalar_type() == at::kFloat) {
    quantize_rows(a, x.data_ptr<float>(), rows, x.size(1), x.stride(0), int(terms));
  } else if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(a, x.data_ptr<at::BFloat16>(), rows, x.size(1), x.stride(0), int(terms));
  } else {
    TORCH_CHECK(false, "quant_matmul: x must be float32 or bfloat16");
  }
  const int64_t padded = groups * kCols;
  torch::Tensor out = torch::empty({rows, padded}, x.options().dtype(at::kFloat));
  const auto* w = packed.data_ptr<uint8_t>();
  const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const auto* mp = has_min ? reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) : nullptr;
  float* o = out.data_ptr<float>();
  if (rows > 0) {
    if (bytes == 512) {
      run_terms<Kind::Q8_0>(a, rows, w, dp, nullptr, groups, o, padded, reference);
    } else if (has_min) {
      run_terms<Kind::Q4_1>(a, rows, w, dp, mp, groups, o, padded, reference);
    } else {
      run_terms<Kind::Q4_0>(a, rows, w, dp, nullptr, groups, o, padded, reference);
    }
  }
  if (padded != out_features) out = out.narrow(1, 0, out_features).contiguous();
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

std::string quant_matmul_path() { return kPath; }

}  // namespace inferd
