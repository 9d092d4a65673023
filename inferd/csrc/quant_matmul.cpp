// Matmul against a GGUF file's own quantized blocks (layers/quant_blocks.py packs them).
//
// y[m, n] = sum over 32-element blocks b of  dw[n,b] * (qw[n,b] . x[m,b])  (+ mw[n,b] * sum x[m,b])
//
// As llama.cpp does, the activations are quantized too, per row and block of 32, to
// int8 with an fp32 scale (da = absmax / 127), so each block's dot product is an exact
// int32 sum of int8 x 4-bit (or 8-bit) products. Unlike llama.cpp, by default a second
// int8 term carries what the first left over (x ~ d1 q1 + d2 q2, about 15 bits of the
// activation instead of 8): one int8 term moved SmolLM2's perplexity by 0.56%, two by
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

// The activations, quantized per row and block.
struct QuantRows {
  std::vector<int8_t> q;    // [rows, K]
  std::vector<float> d;     // [rows, blocks] scale
  std::vector<int32_t> s;   // [rows, blocks] sum of q
  std::vector<float> ds;    // [rows, blocks] d * sum of q (Q4_1's minimum term)
  int64_t k = 0, blocks = 0;
};

inline float f16_to_f32(uint16_t h) {
  // exact: every f16 is an fp32
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename T>
inline float load_float(const T* p) {
  return float(*p);
}

// One block of 32 activations to int8: q = round(x / d), d = absmax / 127 (rounding to
// nearest even, as the vector conversion does), their sum; x becomes what q leaves over
// (x - d * q) for the next term. The vector version does the same IEEE operations.
inline float quantize_block(float* x, int8_t* q, int32_t* sum) {
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  const __m256 vid = _mm256_set1_ps(id), vd = _mm256_set1_ps(d);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));  // round to nearest even
    n = _mm256_min_epi32(hi, _mm256_max_epi32(lo, n));
    total = _mm256_add_epi32(total, n);
    _mm256_storeu_ps(x + 8 * i, _mm256_sub_ps(v[i], _mm256_mul_ps(vd, _mm256_cvtepi32_ps(n))));
    const __m128i n16 = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + 8 * i), _mm_packs_epi16(n16, n16));
  }
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
  *sum = _mm_cvtsi128_si32(t4);
  return d;
#else
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int32_t total = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int v = int(std::nearbyint(x[i] * id));
    q[i] = int8_t(std::min(127, std::max(-127, v)));
    total += q[i];
    x[i] = x[i] - d * float(q[i]);
  }
  *sum = total;
  return d;
#endif
}

// Row r's activations become `terms` virtual rows r * terms + t: the first is x quantized,
// each next one what the ones before left over (x - sum of d * q so far), quantized again.
template <typename T>
void quantize_rows(QuantRows& out, const T* x, int64_t rows, int64_t k, int64_t stride, int terms) {
  const int64_t virt = rows * terms;
  out.k = k;
  out.blocks = k / kBlock;
  out.q.resize(virt * k);
  out.d.resize(virt * out.blocks);
  out.s.resize(virt * out.blocks);
  out.ds.resize(virt * out.blocks);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < out.blocks; ++b) {
        const T* src = x + r * stride + b * kBlock;
        for (int i = 0; i < kBlock; ++i) buf[i] = load_float(src + i);
        for (int t = 0; t < terms; ++t) {
          const int64_t row = r * terms + t, at = row * out.blocks + b;
          int8_t* q = out.q.data() + row * k + b * kBlock;
          const float d = quantize_block(buf, q, &out.s[at]);
          out.d[at] = d;
          out.ds[at] = d * float(out.s[at]);
        }
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

// Arguments of one tile: a group of 16 columns against `rows` consecutive rows.
struct Tile {
  const uint8_t* w;      // the group's packed blocks
  const uint16_t* d;     // [blocks][16]
  const uint16_t* m;     // [blocks][16] or null
  const QuantRows* a;
  int64_t row0;
  float* out;            // the output row of virtual row row0, at the group's first column
  int64_t out_stride;
  int terms;             // virtual rows per output row, summed in order when stored
};

// ---- plain C++: the reference every vector path matches bit for bit ------------

template <Kind kind>
void tile_scalar(const Tile& t, int rows) {
  const int64_t nb = t.a->blocks, k = t.a->k;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = t.row0 + r;
    float acc[kCols] = {0};
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* w = t.w + b * block_bytes<kind>();
      const int8_t* q = t.a->q.data() + row * k + b * kBlock;
      const int64_t at = row * nb + b;
      const float da = t.a->d[at];
      for (int c = 0; c < kCols; ++c) {
        int32_t sum = 0;
        for (int e = 0; e < kBlock; ++e) {
          int level;
          if (kind == Kind::Q8_0) {
            level = w[(e / 4) * 64 + c * 4 + e % 4];
          } else {
            const int p = e / 8, j = e % 4;
            const uint8_t byte = w[p * 64 + c * 4 + j];
            level = (e % 8) < 4 ? (byte & 0x0f) : (byte >> 4);
          }
          sum += level * q[e];
        }
        sum -= level_offset<kind>() * t.a->s[at];
        const float dd = f16_to_f32(t.d[b * kCols + c]) * da;
        acc[c] = acc[c] + dd * float(sum);
        if (kind == Kind::Q4_1) acc[c] = acc[c] + f16_to_f32(t.m[b * kCols + c]) * t.a->ds[at];
      }
    }
    float* o = t.out + (r / t.terms) * t.out_stride;
    for (int c = 0; c < kCols; ++c) o[c] = r % t.terms ? o[c] + acc[c] : acc[c];
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

// Each output row: the sum of its virtual rows (its activation terms), in term order.
inline void store_rows(const Tile& t, const __m512* acc, int rows) {
  for (int r = 0; r < rows; r += t.terms) {
    __m512 v = acc[r];
    for (int j = 1; j < t.terms; ++j) v = _mm512_add_ps(v, acc[r + j]);
    _mm512_storeu_ps(t.out + (r / t.terms) * t.out_stride, v);
  }
}

template <Kind kind, int R>
void tile_avx512(const Tile& t) {
  const int64_t nb = t.a->blocks, k = t.a->k;
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = t.w + b * block_bytes<kind>();
    prefetch_ahead<kind>(t, b);
    __m512i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
    if (kind == Kind::Q8_0) {
      __m512i sum_odd[R];  // two chains of dot products, as below
      for (int r = 0; r < R; ++r) sum_odd[r] = _mm512_setzero_si512();
      for (int ch = 0; ch < 8; ++ch) {
        __m512i wv = _mm512_loadu_si512(w + ch * 64);
#ifndef __AVX512VNNI__
        // maddubs would saturate at 255 x 127 x 2: take |w - 128| and move the sign onto a
        wv = _mm512_xor_si512(wv, _mm512_set1_epi8(char(0x80)));
        const __m512i aw = _mm512_abs_epi8(wv);
        const __mmask64 neg = _mm512_movepi8_mask(wv);
#endif
        for (int r = 0; r < R; ++r) {
          const int8_t* q = t.a->q.data() + (t.row0 + r) * k + b * kBlock;
          __m512i& into = ch % 2 ? sum_odd[r] : sum[r];
#ifdef __AVX512VNNI__
          into = dot4(into, wv, bcast4(q + ch * 4));
#else
          const __m512i a = bcast4(q + ch * 4);
          const __m512i as = _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a);
          into = dot4(into, aw, as);
#endif
        }
      }
      for (int r = 0; r < R; ++r) sum[r] = _mm512_add_epi32(sum[r], sum_odd[r]);
    } else {
      // two chains of dot products rather than one: each waits on the last's latency
      __m512i sum_hi[R];
      for (int r = 0; r < R; ++r) sum_hi[r] = _mm512_setzero_si512();
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(w + p * 64);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = t.a->q.data() + (t.row0 + r) * k + b * kBlock + p * 8;
          sum[r] = dot4(sum[r], lo, bcast4(q));
          sum_hi[r] = dot4(sum_hi[r], hi, bcast4(q + 4));
        }
      }
      for (int r = 0; r < R; ++r) sum[r] = _mm512_add_epi32(sum[r], sum_hi[r]);
    }
    const __m512 dw = scales16(t.d + b * kCols), mw = kind == Kind::Q4_1 ? scales16(t.m + b * kCols) : dw;
    for (int r = 0; r < R; ++r) {
#ifdef __AVX512VNNI__
      constexpr bool offset_in_sum = true;
#else
      constexpr bool offset_in_sum = kind != Kind::Q8_0;  // maddubs took Q8_0's levels signed
#endif
      acc[r] = add_block<kind, offset_in_sum>(acc[r], sum[r], dw, mw, *t.a, (t.row0 + r) * nb + b);
    }
  }
  store_rows(t, acc, R);
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__)
// ---- AMX: 16 rows x 16 columns x one block per tile multiply -------------------
//
// The packed weights are already in AMX's B layout (rows of 16 columns x 4 inputs); the
// 4-bit ones are widened to bytes first. Each block's int32 sums come out exact, as on
// every other path, and go through the same add_block, so the bits do not change.

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
  for (int i : {0, 1}) c.rows[i] = 16, c.colsb[i] = 64;   // C: 16 rows x 16 int32
  for (int i : {2, 3}) c.rows[i] = 16, c.colsb[i] = 32;   // A: 16 rows x 32 int8 activations
  for (int i : {4, 5}) c.rows[i] = 8, c.colsb[i] = 64;    // B: 8 rows of 16 columns x 4 levels
  // GCC does not see ldtilecfg read the struct and drops the stores above without this
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

constexpr int kAmxRows = 16;

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

template <Kind kind>
void tile_amx(const Tile& t) {
  const int64_t nb = t.a->blocks, k = t.a->k;
  alignas(64) uint8_t wbuf[2][512];
  alignas(64) int32_t sums[2][kAmxRows * kCols];
  __m512 acc[kAmxRows];
  for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
  const int8_t* a = t.a->q.data() + t.row0 * k;
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
      for (int r = 0; r < kAmxRows; ++r) {
        const __m512i s = _mm512_load_si512(sums[j] + r * kCols);
        acc[r] = add_block<kind, true>(acc[r], s, dw, mw, *t.a, (t.row0 + r) * nb + bj);
      }
    }
  }
  store_rows(t, acc, kAmxRows);
}
#define INFERD_AMX 1
#endif

constexpr int kMaxRows = 8;
template <Kind kind>
void tile(const Tile& t, int rows) {
  switch (rows) {
    case 8: return tile_avx512<kind, 8>(t);
    case 7: return tile_avx512<kind, 7>(t);
    case 6: return tile_avx512<kind, 6>(t);
    case 5: return tile_avx512<kind, 5>(t);
    case 4: return tile_avx512<kind, 4>(t);
    case 3: return tile_avx512<kind, 3>(t);
    case 2: return tile_avx512<kind, 2>(t);
    default: return tile_avx512<kind, 1>(t);
  }
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

template <Kind kind, int R>
void tile_avx2(const Tile& t) {
  const int64_t nb = t.a->blocks, k = t.a->k;
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = t.w + b * block_bytes<kind>();
    prefetch_ahead<kind>(t, b);
    __m256i sum[R][2];
    for (int h = 0; h < 2; ++h) {
      if (kind == Kind::Q8_0) {
        for (int r = 0; r < R; ++r) sum[r][h] = _mm256_setzero_si256();
        for (int ch = 0; ch < 8; ++ch) {
          // |w - 128| times a with w's sign: maddubs would saturate on w + 128
          const __m256i wv = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ch * 64 + h * 32)), _mm256_set1_epi8(char(0x80)));
          const __m256i aw = _mm256_sign_epi8(wv, wv);
          for (int r = 0; r < R; ++r) {
            const int8_t* q = t.a->q.data() + (t.row0 + r) * k + b * kBlock;
            const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(q + ch * 4), wv));
            sum[r][h] = _mm256_add_epi32(sum[r][h], _mm256_madd_epi16(pairs, ones));
          }
        }
      } else {
        // 4-bit levels: 8 pair sums of at most 2 x 15 x 127 each fit one int16
        __m256i pairs[R];
        for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int r = 0; r < R; ++r) {
            const int8_t* q = t.a->q.data() + (t.row0 + r) * k + b * kBlock + p * 8;
            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(lo, bcast4(q)));
            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(hi, bcast4(q + 4)));
          }
        }
        for (int r = 0; r < R; ++r) sum[r][h] = _mm256_madd_epi16(pairs[r], ones);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.d + b * kCols + h * 8)));
      __m256 mw = _mm256_setzero_ps();
      if (kind == Kind::Q4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.m + b * kCols + h * 8)));
      for (int r = 0; r < R; ++r) {
        const int64_t at = (t.row0 + r) * nb + b;
        __m256i s = sum[r][h];
        if (kind == Kind::Q4_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * t.a->s[at]));
        const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(t.a->d[at]));
        acc[r][h] = _mm256_add_ps(acc[r][h], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(s)));
        if (kind == Kind::Q4_1) acc[r][h] = _mm256_add_ps(acc[r][h], _mm256_mul_ps(mw, _mm256_set1_ps(t.a->ds[at])));
      }
    }
  }
  for (int r = 0; r < R; r += t.terms) {  // each output row: its terms summed in order
    for (int h = 0; h < 2; ++h) {
      __m256 v = acc[r][h];
      for (int j = 1; j < t.terms; ++j) v = _mm256_add_ps(v, acc[r + j][h]);
      _mm256_storeu_ps(t.out + (r / t.terms) * t.out_stride + h * 8, v);
    }
  }
}

constexpr int kMaxRows = 4;
template <Kind kind>
void tile(const Tile& t, int rows) {
  switch (rows) {
    case 4: return tile_avx2<kind, 4>(t);
    case 3: return tile_avx2<kind, 3>(t);
    case 2: return tile_avx2<kind, 2>(t);
    default: return tile_avx2<kind, 1>(t);
  }
}
constexpr const char* kPath = "avx2";

#else
constexpr int kMaxRows = 2;  // whole output rows of two terms
template <Kind kind>
void tile(const Tile& t, int rows) {
  tile_scalar<kind>(t, rows);
}
constexpr const char* kPath = "scalar";
#endif

template <Kind kind>
void run(const QuantRows& a, int64_t rows, const uint8_t* packed, const uint16_t* d, const uint16_t* m,
         int64_t groups, float* out, int64_t out_stride, int terms, bool reference) {
  // virtual rows: `terms` per output row; every tile holds whole output rows (kMaxRows and
  // kAmxRows are multiples of the terms allowed)
  const int64_t nb = a.blocks;
  // a thread takes whole column groups and every row for them: the group's weights
  // (a few KiB) stay in L1 while the rows go by. Even one row is split between the
  // threads (streaming the weights from L3 or memory is what a decode step waits on)
  // once each gets ~8 groups of 576 inputs, about a microsecond of work.
  const int64_t grain = std::max<int64_t>(1, 144 / std::max<int64_t>(1, rows * nb));
#ifdef INFERD_AMX
  const bool amx = !reference && rows >= kAmxRows && amx_usable();
#endif
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
#ifdef INFERD_AMX
    if (amx) configure_tiles();  // the tile configuration is per thread
#endif
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t r0 = 0; r0 < rows;) {
        Tile t{packed + g * nb * block_bytes<kind>(), d + g * nb * kCols, m ? m + g * nb * kCols : nullptr,
               &a, r0, out + (r0 / terms) * out_stride + g * kCols, out_stride, terms};
#ifdef INFERD_AMX
        if (amx && rows - r0 >= kAmxRows) {
          tile_amx<kind>(t);
          r0 += kAmxRows;
          continue;
        }
#endif
        const int n = int(std::min<int64_t>(kMaxRows, rows - r0));
        if (reference) {
          tile_scalar<kind>(t, n);
        } else {
          tile<kind>(t, n);
        }
        r0 += n;
      }
    }
#ifdef INFERD_AMX
    if (amx) _tile_release();
#endif
  });
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
  const int64_t rows = x.size(0), virt = rows * terms;
  QuantRows a;
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
  const int t = int(terms);
  if (rows > 0) {
    if (bytes == 512) {
      run<Kind::Q8_0>(a, virt, w, dp, nullptr, groups, o, padded, t, reference);
    } else if (has_min) {
      run<Kind::Q4_1>(a, virt, w, dp, mp, groups, o, padded, t, reference);
    } else {
      run<Kind::Q4_0>(a, virt, w, dp, nullptr, groups, o, padded, t, reference);
    }
  }
  if (padded != out_features) out = out.narrow(1, 0, out_features).contiguous();
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

std::string quant_matmul_path() { return kPath; }

}  // namespace inferd
