// SIMD kernels for the 16-row block layout described in kernels.h. No torch headers here: this file only
// needs intrinsics, and compiles in parallel with the torch bindings (gemv.cpp).
//
// ISA code paths live in `#pragma GCC target` regions and are chosen at run time, so one build serves
// AVX2-only and AVX-512 machines and tests can force the AVX2 path. Only functions defined inside a region
// carry its target; the run-time selection at the end is baseline x86-64 code.
#include "kernels.h"

#include <immintrin.h>

#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace polylm_gemv {

// Whether the AVX-512 decode kernels should prefetch in software (see the AVX-512 section): yes on Intel,
// no on AMD. POLYLM_GEMV_PREFETCH=0|1 overrides it (for measuring).
static bool prefetch_helps() {
  if (const char* v = std::getenv("POLYLM_GEMV_PREFETCH"); v != nullptr && *v != '\0') return std::strcmp(v, "0") != 0;
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
}

// ----------------------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL, DQ, VNNI). 2 streams per thread. Software prefetch is chosen per CPU vendor (prefetch_helps):
// on Zen 4 (2 threads, weights from DRAM) none read closest to the plain-read ceiling (a prefetch 1 KB ahead cost
// 10-15%; 3-4 streams were equal or slightly worse); on an Intel Xeon without AVX512-BF16 (Cascade Lake class,
// 2 threads) a prefetch 1 KB ahead per stream made the int4/int8/bf16 decode kernels 10-15% faster and 2-digit
// instead of 3-digit activations gained nothing once it did (the kernels wait on memory, not on vpdpbusd).
// ----------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace avx512 {

static inline __m512 bf16x16_to_fp32(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline __m512 load_scales(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_scales(const uint16_t* p) { return bf16x16_to_fp32(p); }

template <int KIND>
static inline void load_chunk(const uint8_t* p, __m512* w) {
  if constexpr (KIND == kBF16) {
    __m512i raw = _mm512_loadu_si512(p);
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    w[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else if constexpr (KIND == kF16) {
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
  } else {
    w[0] = _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

// Software prefetch distance per stream where the CPU gains from it (Intel), else 0 (AMD).
constexpr int kPrefetchBytes = 1024;

static inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

template <int KIND, int M, int S, int PF>
static void float_blocks(const FloatArgs& a, const int64_t* blk) {
  constexpr int kK = chunk_k(KIND);
  constexpr bool kHoistX = M <= 4;
  const float* x = static_cast<const float*>(a.x);
  const int64_t nc = a.nchunks;
  const uint8_t* wp[S];
  __m512 acc[S][M];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    wp[s] = a.w + blk[s] * nc * kChunkBytes;
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < nc; ++c) {
    // Up to 4 rows the x broadcasts stay in registers for all S blocks; beyond that the accumulators need the
    // registers and every FMA broadcasts its x value from memory (an embedded-broadcast operand).
    __m512 xv[kHoistX ? M : 1][kK];
    if constexpr (kHoistX) {
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
        for (int j = 0; j < kK; ++j) xv[m][j] = _mm512_set1_ps(x[m * a.ldx + c * kK + j]);
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const uint8_t* p = wp[s] + c * kChunkBytes;
      if constexpr (PF > 0) prefetch(p + PF);
      __m512 w[kK];
      load_chunk<KIND>(p, w);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
        for (int j = 0; j < kK; ++j) {
          __m512 xb;
          if constexpr (kHoistX) xb = xv[m][j];
          else xb = _mm512_set1_ps(x[m * a.ldx + c * kK + j]);
          acc[s][m] = _mm512_fmadd_ps(w[j], xb, acc[s][m]);
        }
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    const __m512 b = _mm512_loadu_ps(a.bias + blk[s] * kRows);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(a.y + m * a.ldy + blk[s] * kRows, _mm512_add_ps(acc[s][m], b));
  }
}

// The 3-digit fixed-point activation against int8 (stored +128 as u8) or int4 (u4) weights with vpdpbusd:
// exact integer dot products per digit, one float combination per group.
template <int KIND, int M, int S, int PF>
static void quant_blocks(const QuantArgs& a, const int64_t* blk) {
  constexpr bool kIsInt4 = KIND == kInt4;
  const int64_t cpg = a.chunks_per_group, ng = a.ngroups;
  const int32_t* xd = a.xdigits;
  const int64_t ldx = a.ldx;
  const uint8_t* wp[S];
  __m512 acc[S][M];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    wp[s] = a.w + blk[s] * ng * cpg * kChunkBytes;
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < ng; ++g) {
    __m512i P[S][M][kDigits];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 3
        for (int d = 0; d < kDigits; ++d) P[s][m][d] = _mm512_setzero_si512();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        const uint8_t* p = wp[s] + c * kChunkBytes;
        if constexpr (PF > 0) prefetch(p + PF);
        const __m512i raw = _mm512_loadu_si512(p);
        if constexpr (!kIsInt4) {
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m)
#pragma GCC unroll 3
            for (int d = 0; d < kDigits; ++d)
              P[s][m][d] = _mm512_dpbusd_epi32(P[s][m][d], raw, _mm512_set1_epi32(xd[(m * kDigits + d) * ldx + c]));
        } else {
          const __m512i lo = _mm512_and_si512(raw, nibble);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(raw, 4), nibble);
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m)
#pragma GCC unroll 3
            for (int d = 0; d < kDigits; ++d) {
              const int32_t* xw = xd + (m * kDigits + d) * ldx + 2 * c;
              P[s][m][d] = _mm512_dpbusd_epi32(P[s][m][d], lo, _mm512_set1_epi32(xw[0]));
              P[s][m][d] = _mm512_dpbusd_epi32(P[s][m][d], hi, _mm512_set1_epi32(xw[1]));
            }
        }
      }
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const int64_t so = (blk[s] * ng + g) * kRows;
      __m512 sc;
      if constexpr (kIsInt4) sc = load_scales(static_cast<const uint16_t*>(a.scales) + so);
      else sc = load_scales(static_cast<const float*>(a.scales) + so);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const int32_t* cr = a.corr + (m * ng + g) * kDigits;
        const __m512i p0 = _mm512_sub_epi32(P[s][m][0], _mm512_set1_epi32(cr[0]));
        const __m512i p1 = _mm512_sub_epi32(P[s][m][1], _mm512_set1_epi32(cr[1]));
        const __m512i p2 = _mm512_sub_epi32(P[s][m][2], _mm512_set1_epi32(cr[2]));
        __m512 f = _mm512_cvtepi32_ps(p0);
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(256.0f), f);
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), _mm512_set1_ps(65536.0f), f);
        acc[s][m] = _mm512_fmadd_ps(f, sc, acc[s][m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    const __m512 b = _mm512_loadu_ps(a.bias + blk[s] * kRows);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      _mm512_storeu_ps(a.y + m * a.ldy + blk[s] * kRows, _mm512_fmadd_ps(acc[s][m], _mm512_set1_ps(a.sx[m]), b));
  }
}

static inline int32_t hsum(__m512i v) { return _mm512_reduce_add_epi32(v); }

// Quantize one activation row (fp32, zero-padded to a multiple of 16 and of the group size) into 3 balanced
// byte digits and the per-group digit sums times zero_point.
static void prep_digits(const float* x, int64_t kpad, int64_t group, int zero_point,
                        int8_t* digits /* [3][kpad] */, int32_t* corr /* [NG][3] */, float* sx_out) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (int64_t k = 0; k < kpad; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const int64_t ng = kpad / group;
  if (amax == 0.0f || unordered || std::isinf(amax)) {
    // All zeros: y = bias. NaN/inf: a NaN scale makes every output NaN, as the float paths would (roughly).
    std::memset(digits, 0, static_cast<size_t>(kDigits * kpad));
    std::memset(corr, 0, static_cast<size_t>(ng * kDigits) * sizeof(int32_t));
    *sx_out = amax == 0.0f && !unordered ? 0.0f : std::nanf("");
    return;
  }
  const float inv = kDigitMax / amax;
  const float sx = amax / kDigitMax;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i qmax = _mm512_set1_epi32(static_cast<int32_t>(kDigitMax));
  const __m512i qmin = _mm512_set1_epi32(-static_cast<int32_t>(kDigitMax));
  const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
  for (int64_t g = 0; g < ng; ++g) {
    __m512i e_sum[kDigits] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      const __m512 v = _mm512_loadu_ps(x + k);
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));  // round to nearest even
      q = _mm512_min_epi32(_mm512_max_epi32(q, qmin), qmax);
#pragma GCC unroll 3
      for (int d = 0; d < kDigits; ++d) {
        // e = ((q + 128) mod 256) - 128, q = (q - e) / 256: balanced digits, exact for |q| <= kDigitMax.
        const __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, c128), c255), c128);
        q = _mm512_srai_epi32(_mm512_sub_epi32(q, e), 8);
        e_sum[d] = _mm512_add_epi32(e_sum[d], e);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(digits + d * kpad + k), _mm512_cvtepi32_epi8(e));
      }
    }
    for (int d = 0; d < kDigits; ++d) corr[g * kDigits + d] = zero_point * hsum(e_sum[d]);
  }
  *sx_out = sx;
}

// Transposed unpack: float kinds.
template <int KIND>
static void float_unpack(const UnpackArgs& a, int64_t b0, int64_t b, int64_t b_end) {
  constexpr int kK = chunk_k(KIND);
  for (; b < b_end; ++b) {
    const uint8_t* base = a.w + b * a.nchunks * kChunkBytes;
    const int64_t col = (b - b0) * kRows;
    for (int64_t c = 0; c < a.nchunks; ++c) {
      const uint8_t* p = base + c * kChunkBytes;
      const int64_t k0 = c * kK;
      if (KIND == kBF16 && a.out_bf16) {
        const __m512i raw = _mm512_loadu_si512(p);
        uint16_t* o = static_cast<uint16_t*>(a.out) + k0 * a.ldw + col;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(raw));
        if (k0 + 1 < a.K)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + a.ldw), _mm512_cvtepi32_epi16(_mm512_srli_epi32(raw, 16)));
      } else {
        __m512 w[kK];
        load_chunk<KIND>(p, w);
        float* o = static_cast<float*>(a.out) + k0 * a.ldw + col;
#pragma GCC unroll 2
        for (int j = 0; j < kK; ++j)
          if (k0 + j < a.K) _mm512_storeu_ps(o + j * a.ldw, w[j]);
      }
    }
  }
}

// fp32 -> bf16 bits (in the low 16 bits of each lane), rounded to nearest even like c10::BFloat16 (inputs
// here are finite).
static inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

static inline void store_row(const UnpackArgs& a, int64_t k, int64_t col, __m512 v) {
  if (a.out_bf16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(a.out) + k * a.ldw + col),
                        _mm512_cvtepi32_epi16(bf16_bits(v)));
  } else {
    _mm512_storeu_ps(static_cast<float*>(a.out) + k * a.ldw + col, v);
  }
}

// The scales of block b, group g as an fp32 row vector.
template <int KIND>
static inline __m512 group_scales(const UnpackArgs& a, int64_t b, int64_t g) {
  const int64_t so = (b * a.ngroups + g) * kRows;
  return KIND == kInt8 ? load_scales(static_cast<const float*>(a.scales) + so)
                       : load_scales(static_cast<const uint16_t*>(a.scales) + so);
}

// The 16 rows' weights at k-value j of a quantized chunk: q * s (int8, q = stored - 128; int4, q = stored - 8).
template <int KIND>
static inline __m512 dequant_at(__m512i raw, int j, __m512 sc) {
  __m512i q;
  if constexpr (KIND == kInt8) {
    q = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(raw, 8 * j), _mm512_set1_epi32(0xFF)),
                         _mm512_set1_epi32(128));
  } else {
    const int bit = j < 4 ? 8 * j : 8 * (j - 4) + 4;
    q = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(raw, bit), _mm512_set1_epi32(0xF)),
                         _mm512_set1_epi32(8));
  }
  return _mm512_mul_ps(_mm512_cvtepi32_ps(q), sc);
}

// Transposed dequantize.
template <int KIND>
static void quant_unpack(const UnpackArgs& a, int64_t b0, int64_t b, int64_t b_end) {
  constexpr int kK = quant_chunk_k(KIND);
  for (; b < b_end; ++b) {
    const uint8_t* base = a.w + b * a.ngroups * a.chunks_per_group * kChunkBytes;
    const int64_t col = (b - b0) * kRows;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const __m512 sc = group_scales<KIND>(a, b, g);
      for (int64_t c = g * a.chunks_per_group; c < (g + 1) * a.chunks_per_group; ++c) {
        const __m512i raw = _mm512_loadu_si512(base + c * kChunkBytes);
        const int64_t k0 = c * kK;
#pragma GCC unroll 8
        for (int j = 0; j < kK; ++j) {
          if (k0 + j >= a.K) break;
          store_row(a, k0 + j, col, dequant_at<KIND>(raw, j, sc));
        }
      }
    }
  }
}

// Dequantize into bf16 blocks: each quantized chunk (kK k-values) becomes kK / 2 chunks of bf16 pairs.
template <int KIND>
static void quant_to_bf16(const UnpackArgs& a, int64_t b, int64_t b_end, uint8_t* out) {
  constexpr int kK = quant_chunk_k(KIND);
  const int64_t out_chunks = a.ngroups * a.chunks_per_group * kK / 2;
  for (int64_t i = 0; b < b_end; ++b, ++i) {
    const uint8_t* base = a.w + b * a.ngroups * a.chunks_per_group * kChunkBytes;
    uint8_t* o = out + i * out_chunks * kChunkBytes;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const __m512 sc = group_scales<KIND>(a, b, g);
      for (int64_t c = g * a.chunks_per_group; c < (g + 1) * a.chunks_per_group; ++c) {
        const __m512i raw = _mm512_loadu_si512(base + c * kChunkBytes);
        const int64_t k0 = c * kK;
#pragma GCC unroll 4
        for (int j = 0; j < kK; j += 2) {
          const __m512 zero = _mm512_setzero_ps();
          const __m512 lo = k0 + j < a.K ? dequant_at<KIND>(raw, j, sc) : zero;
          const __m512 hi = k0 + j + 1 < a.K ? dequant_at<KIND>(raw, j + 1, sc) : zero;
          const __m512i pair = _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32(bf16_bits(hi), 16));
          _mm512_storeu_si512(o + (k0 + j) / 2 * kChunkBytes, pair);
        }
      }
    }
  }
}

// The vector operations of fused.h on 16 fp32 lanes; a count of active lanes stands for a mask.
struct V {
  using F = __m512;
  static constexpr int kLanes = 16;
  static __mmask16 mask(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F max_active(F acc, F v, int n) { return _mm512_mask_max_ps(acc, mask(n), acc, v); }
  static F keep_active(F v, int n) { return _mm512_maskz_mov_ps(mask(n), v); }
  // v, with 0 in the lanes where x < limit (NaN x keeps v)
  static F zero_below(F v, F x, float limit) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_NLT_UQ), v);
  }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale2(F p, F n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
  // 1 / d for d >= 1: the 2^-14 estimate and one Newton step.
  static F recip(F d) {
    const F r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static float top(F v) { return _mm512_reduce_max_ps(v); }
  // Lane i: the sum of s[i]'s lanes (a transpose-and-add tree: pairs within 128-bit lanes, then across them).
  static F sums(const F* s) {
    F t[8], u[4], w[2];
    for (int i = 0; i < 8; ++i)
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
      const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  }
  static F loadf(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void storef(float* p, int n, F v) { _mm512_mask_storeu_ps(p, mask(n), v); }
  // Element i.. of an fp32 or bf16 array, n lanes active (the rest zero).
  static F load(const void* p, int64_t i, int n, bool bf16) {
    if (!bf16) return loadf(static_cast<const float*>(p) + i, n);
    const __m256i raw = _mm256_maskz_loadu_epi16(mask(n), static_cast<const uint16_t*>(p) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(void* p, int64_t i, int n, F v, bool bf16) {
    if (!bf16) return storef(static_cast<float*>(p) + i, n, v);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mask(n), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
};

#include "fused.h"

// The decode kernels with software prefetch PF bytes ahead per stream (0: none).
template <int PF>
static void fill_blocks(Kernels& k) {
  k.float_blocks[kBF16][0] = &float_blocks<kBF16, 1, 2, PF>;
  k.float_blocks[kBF16][1] = &float_blocks<kBF16, 2, 2, PF>;
  k.float_blocks[kBF16][2] = &float_blocks<kBF16, 4, 2, PF>;
  k.float_blocks[kF16][0] = &float_blocks<kF16, 1, 2, PF>;
  k.float_blocks[kF16][1] = &float_blocks<kF16, 2, 2, PF>;
  k.float_blocks[kF16][2] = &float_blocks<kF16, 4, 2, PF>;
  k.float_blocks[kF32][0] = &float_blocks<kF32, 1, 2, PF>;
  k.float_blocks[kF32][1] = &float_blocks<kF32, 2, 2, PF>;
  k.float_blocks[kF32][2] = &float_blocks<kF32, 4, 2, PF>;
  k.quant_blocks[kInt8][0] = &quant_blocks<kInt8, 1, 2, PF>;
  k.quant_blocks[kInt8][1] = &quant_blocks<kInt8, 2, 2, PF>;
  k.quant_blocks[kInt8][2] = &quant_blocks<kInt8, 4, 1, PF>;
  k.quant_blocks[kInt4][0] = &quant_blocks<kInt4, 1, 2, PF>;
  k.quant_blocks[kInt4][1] = &quant_blocks<kInt4, 2, 2, PF>;
  k.quant_blocks[kInt4][2] = &quant_blocks<kInt4, 4, 1, PF>;
  k.float_blocks[kBF16][3] = &float_blocks<kBF16, 8, 1, PF>;
  k.float_blocks[kF16][3] = &float_blocks<kF16, 8, 1, PF>;
  k.float_blocks[kF32][3] = &float_blocks<kF32, 8, 1, PF>;
  k.float_blocks[kBF16][4] = &float_blocks<kBF16, 16, 1, PF>;
  k.float_blocks[kF16][4] = &float_blocks<kF16, 16, 1, PF>;
  k.float_blocks[kF32][4] = &float_blocks<kF32, 16, 1, PF>;
}

static void fill_kernels(Kernels& k) {
  if (prefetch_helps()) fill_blocks<kPrefetchBytes>(k);
  else fill_blocks<0>(k);
  const int fs[kSlots] = {2, 2, 2, 1, 1}, qs[kSlots] = {2, 2, 1, 0, 0};
  for (int i = 0; i < kSlots; ++i) k.float_streams[i] = fs[i], k.quant_streams[i] = qs[i];
  k.float_unpack[kBF16] = &float_unpack<kBF16>;
  k.float_unpack[kF16] = &float_unpack<kF16>;
  k.float_unpack[kF32] = &float_unpack<kF32>;
  k.quant_unpack[kInt8] = &quant_unpack<kInt8>;
  k.quant_unpack[kInt4] = &quant_unpack<kInt4>;
  k.quant_to_bf16[kInt8] = &quant_to_bf16<kInt8>;
  k.quant_to_bf16[kInt4] = &quant_to_bf16<kInt4>;
  fill_fused(k);
  k.prep_digits = &prep_digits;
}

}  // namespace avx512
#pragma GCC pop_options

// bf16 activations x bf16 weights with vdpbf16ps: one instruction per 64-byte chunk instead of four.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace avx512bf16 {

template <int M, int S>
static void bf16_dot_blocks(const FloatArgs& a, const int64_t* blk) {
  const int32_t* x = static_cast<const int32_t*>(a.x);
  const int64_t nc = a.nchunks;
  const uint8_t* wp[S];
  __m512 acc[S][M];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    wp[s] = a.w + blk[s] * nc * kChunkBytes;
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[s][m] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < nc; ++c) {
    __m512i xv[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) xv[m] = _mm512_set1_epi32(x[m * a.ldx + c]);
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const uint8_t* p = wp[s] + c * kChunkBytes;
      const __m512i raw = _mm512_loadu_si512(p);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[s][m] = _mm512_dpbf16_ps(acc[s][m], (__m512bh)raw, (__m512bh)xv[m]);
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    const __m512 b = _mm512_loadu_ps(a.bias + blk[s] * kRows);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(a.y + m * a.ldy + blk[s] * kRows, _mm512_add_ps(acc[s][m], b));
  }
}

// One register tile of the GEMM: rows [m, m + MR) of x by R blocks starting at output column col, over all
// kchunks; the R weight streams come from L2 (the panel is reused by every tile of rows).
template <int MR, int R>
static void gemm_tile(const GemmArgs& a, const uint8_t* w, int64_t col, int64_t m) {
  const int64_t stride = a.nchunks * kChunkBytes;
  const int32_t* x = a.x + m * a.ldx;
  __m512 acc[MR][R];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < a.kchunks; ++c) {
    __m512i wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * stride + c * kChunkBytes);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(x[i * a.ldx + c]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)wv[r], xb);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int64_t n = col + r * kRows;
    if (n >= a.N) break;
    const __mmask16 mask = a.N - n >= kRows ? __mmask16(0xFFFF) : __mmask16((1u << (a.N - n)) - 1);
    const __m512 bias = _mm512_loadu_ps(a.bias + n);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512 v = _mm512_add_ps(acc[i][r], bias);
      if (a.y_bf16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + (m + i) * a.ldy + n, mask,
                                 (__m256i)_mm512_cvtneps_pbh(v));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(a.y) + (m + i) * a.ldy + n, mask, v);
    }
  }
}

using TileFn = void (*)(const GemmArgs&, const uint8_t*, int64_t, int64_t);

template <int MR>
static constexpr TileFn tile_row[kGemmBlocks] = {&gemm_tile<MR, 1>, &gemm_tile<MR, 2>, &gemm_tile<MR, 3>,
                                                 &gemm_tile<MR, 4>};
static constexpr const TileFn* kTiles[kGemmRows] = {tile_row<1>, tile_row<2>, tile_row<3>,
                                                    tile_row<4>, tile_row<5>, tile_row<6>};

static void bf16_gemm(const GemmArgs& a, const uint8_t* w, int64_t b, int64_t b_end) {
  const int64_t stride = a.nchunks * kChunkBytes;
  for (int64_t b0 = b; b0 < b_end; b0 += kGemmBlocks) {
    const int r = static_cast<int>(std::min<int64_t>(kGemmBlocks, b_end - b0));
    const uint8_t* panel = w + (b0 - b) * stride;
    // Full 6-row tiles; a remainder of 1-2 rows is merged with the last full tile into two balanced tiles
    // (e.g. 8 = 4 + 4), because a 1-2 row tile reloads the whole panel for very few dot products.
    const int64_t tail = a.M % kGemmRows, full = a.M / kGemmRows - (tail > 0 && tail < 3 && a.M > kGemmRows);
    int64_t m = 0;
    for (; m < full * kGemmRows; m += kGemmRows) kTiles[kGemmRows - 1][r - 1](a, panel, b0 * kRows, m);
    for (int64_t left = a.M - m; left > 0;) {
      const int64_t rows = left > kGemmRows ? (left + 1) / 2 : left;
      kTiles[rows - 1][r - 1](a, panel, b0 * kRows, m);
      m += rows, left -= rows;
    }
  }
}

static void fill_kernels(Kernels& k) {
  k.bf16_gemm = &bf16_gemm;
  k.bf16_dot_blocks[0] = &bf16_dot_blocks<1, 2>;
  k.bf16_dot_blocks[1] = &bf16_dot_blocks<2, 2>;
  k.bf16_dot_blocks[2] = &bf16_dot_blocks<4, 2>;
  const int ds[3] = {2, 2, 2};
  for (int i = 0; i < 3; ++i) k.dot_streams[i] = ds[i];
}

}  // namespace avx512bf16
#pragma GCC pop_options

// ----------------------------------------------------------------------------------------------------------
// AVX2 (+FMA, F16C): a 64-byte chunk is two 8-row halves.
// ----------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// Software prefetch distance per stream. On the Zen 3 AVX2 machine of PERF_NOTES it was neutral for weights in
// DRAM and 2-3x faster for L3-resident ones; on the Zen 4 AVX-512 machine it cost 10-15% from DRAM and was
// neutral from L3, so the AVX-512 kernels do without.
constexpr int kPrefetchBytes = 1024;

static inline __m256 bf16x8_to_fp32(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline __m256 load_scales(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load_scales(const uint16_t* p) { return bf16x8_to_fp32(p); }

template <int KIND>
static inline void load_half(const uint8_t* p, int h, __m256* w) {
  if constexpr (KIND == kBF16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else if constexpr (KIND == kF16) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
    w[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * h)));
  } else {
    w[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(p + 32 * h));
  }
}

template <int KIND, int M, int S>
static void float_blocks(const FloatArgs& a, const int64_t* blk) {
  constexpr int kK = chunk_k(KIND);
  const float* x = static_cast<const float*>(a.x);
  const int64_t nc = a.nchunks;
  const uint8_t* wp[S];
  __m256 acc[S][M][2];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    wp[s] = a.w + blk[s] * nc * kChunkBytes;
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[s][m][0] = acc[s][m][1] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < nc; ++c) {
    __m256 xv[M][kK];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
      for (int j = 0; j < kK; ++j) xv[m][j] = _mm256_set1_ps(x[m * a.ldx + c * kK + j]);
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const uint8_t* p = wp[s] + c * kChunkBytes;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256 w[kK];
        load_half<KIND>(p, h, w);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
          for (int j = 0; j < kK; ++j) acc[s][m][h] = _mm256_fmadd_ps(w[j], xv[m][j], acc[s][m][h]);
      }
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 b = _mm256_loadu_ps(a.bias + blk[s] * kRows + 8 * h);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        _mm256_storeu_ps(a.y + m * a.ldy + blk[s] * kRows + 8 * h, _mm256_add_ps(acc[s][m][h], b));
    }
}

// Weight j of the chunk (k0 + j) for the 8 rows of a half, as exact fp32 integers.  `raw` has been xor-ed
// so that signed values sit in place: int8 bytes ^ 0x80, int4 nibbles ^ 0x8 (two's complement).
template <int KIND, int J>
static inline __m256 weight_at(__m256i raw) {
  if constexpr (KIND == kInt8) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw, 24 - 8 * J), 24));
  } else {
    constexpr int bit = J < 4 ? 8 * J : 8 * (J - 4) + 4;
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw, 28 - bit), 28));
  }
}

template <int KIND, int M, int S, int J>
static inline void quant_fma(const uint8_t* const* wp, int64_t c, const float* x, int64_t ldx,
                             __m256 (&part)[S][M][2]) {
  constexpr int kK = quant_chunk_k(KIND);
  __m256 xv[M];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) xv[m] = _mm256_set1_ps(x[m * ldx + c * kK + J]);
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[s] + c * kChunkBytes + 32 * h));
      if constexpr (KIND == kInt8) raw = _mm256_xor_si256(raw, _mm256_set1_epi32(static_cast<int>(0x80808080u)));
      if constexpr (KIND == kInt4) raw = _mm256_xor_si256(raw, _mm256_set1_epi32(static_cast<int>(0x88888888u)));
      const __m256 w = weight_at<KIND, J>(raw);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) part[s][m][h] = _mm256_fmadd_ps(w, xv[m], part[s][m][h]);
    }
}

template <int KIND, int M, int S, int... J>
static inline void quant_chunk(const uint8_t* const* wp, int64_t c, const float* x, int64_t ldx,
                               __m256 (&part)[S][M][2], std::integer_sequence<int, J...>) {
  (quant_fma<KIND, M, S, J>(wp, c, x, ldx, part), ...);
}

template <int KIND, int M, int S>
static void quant_blocks(const QuantArgs& a, const int64_t* blk) {
  const int64_t cpg = a.chunks_per_group, ng = a.ngroups;
  const uint8_t* wp[S];
  __m256 acc[S][M][2];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    wp[s] = a.w + blk[s] * ng * cpg * kChunkBytes;
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[s][m][0] = acc[s][m][1] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < ng; ++g) {
    __m256 part[S][M][2];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) part[s][m][0] = part[s][m][1] = _mm256_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s)
        _mm_prefetch(reinterpret_cast<const char*>(wp[s] + c * kChunkBytes + kPrefetchBytes), _MM_HINT_T0);
      quant_chunk<KIND, M, S>(wp, c, a.x, a.ldx, part, std::make_integer_sequence<int, quant_chunk_k(KIND)>{});
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int64_t so = (blk[s] * ng + g) * kRows + 8 * h;
        __m256 sc;
        if constexpr (KIND == kInt4) sc = load_scales(static_cast<const uint16_t*>(a.scales) + so);
        else sc = load_scales(static_cast<const float*>(a.scales) + so);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) acc[s][m][h] = _mm256_fmadd_ps(part[s][m][h], sc, acc[s][m][h]);
      }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 b = _mm256_loadu_ps(a.bias + blk[s] * kRows + 8 * h);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        _mm256_storeu_ps(a.y + m * a.ldy + blk[s] * kRows + 8 * h, _mm256_add_ps(acc[s][m][h], b));
    }
}

// 8 fp32 -> 8 bf16, rounded to nearest even like c10::BFloat16 (inputs here are finite).
static inline __m128i bf16x8(__m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

static inline void store_row8(const UnpackArgs& a, int64_t k, int64_t col, __m256 v) {
  if (a.out_bf16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(a.out) + k * a.ldw + col), bf16x8(v));
  } else {
    _mm256_storeu_ps(static_cast<float*>(a.out) + k * a.ldw + col, v);
  }
}

template <int KIND>
static void float_unpack(const UnpackArgs& a, int64_t b0, int64_t b, int64_t b_end) {
  constexpr int kK = chunk_k(KIND);
  for (; b < b_end; ++b) {
    const uint8_t* base = a.w + b * a.nchunks * kChunkBytes;
    for (int64_t c = 0; c < a.nchunks; ++c) {
      const int64_t k0 = c * kK;
      for (int h = 0; h < 2; ++h) {
        __m256 w[kK];
        load_half<KIND>(base + c * kChunkBytes, h, w);
        for (int j = 0; j < kK; ++j)
          if (k0 + j < a.K) store_row8(a, k0 + j, (b - b0) * kRows + 8 * h, w[j]);
      }
    }
  }
}

template <int KIND>
static void quant_unpack(const UnpackArgs& a, int64_t b0, int64_t b, int64_t b_end) {
  constexpr int kK = quant_chunk_k(KIND);
  for (; b < b_end; ++b) {
    const uint8_t* base = a.w + b * a.ngroups * a.chunks_per_group * kChunkBytes;
    for (int64_t g = 0; g < a.ngroups; ++g)
      for (int h = 0; h < 2; ++h) {
        const int64_t so = (b * a.ngroups + g) * kRows + 8 * h;
        const __m256 sc = KIND == kInt8 ? load_scales(static_cast<const float*>(a.scales) + so)
                                        : load_scales(static_cast<const uint16_t*>(a.scales) + so);
        for (int64_t c = g * a.chunks_per_group; c < (g + 1) * a.chunks_per_group; ++c) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + c * kChunkBytes + 32 * h));
          const int64_t k0 = c * kK;
          for (int j = 0; j < kK; ++j) {
            if (k0 + j >= a.K) break;
            __m256i q;
            if constexpr (KIND == kInt8) {
              q = _mm256_sub_epi32(_mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_set1_epi32(8 * j)),
                                                    _mm256_set1_epi32(0xFF)),
                                   _mm256_set1_epi32(128));
            } else {
              const int bit = j < 4 ? 8 * j : 8 * (j - 4) + 4;
              q = _mm256_sub_epi32(
                  _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_set1_epi32(bit)), _mm256_set1_epi32(0xF)),
                  _mm256_set1_epi32(8));
            }
            store_row8(a, k0 + j, (b - b0) * kRows + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(q), sc));
          }
        }
      }
  }
}

// The memory-read baseline: OR of every 32-byte word, walking `streams` equal sub-ranges in lockstep.
static uint64_t read_streams(const uint8_t* p, int64_t bytes, int streams) {
  const int64_t per = bytes / streams / kChunkBytes * kChunkBytes;
  __m256i acc[kMaxStreams];
  for (int s = 0; s < streams; ++s) acc[s] = _mm256_setzero_si256();
  for (int64_t off = 0; off < per; off += kChunkBytes)
    for (int s = 0; s < streams; ++s) {
      const uint8_t* q = p + s * per + off;
      acc[s] = _mm256_or_si256(acc[s], _mm256_or_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
                                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32))));
    }
  __m256i all = _mm256_setzero_si256();
  for (int s = 0; s < streams; ++s) all = _mm256_or_si256(all, acc[s]);
  uint64_t out[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), all);
  for (int64_t i = per * streams; i < bytes; ++i) out[0] |= p[i];
  return out[0] | out[1] | out[2] | out[3];
}

// The vector operations of fused.h on 8 fp32 lanes; partial vectors (n < 8 active lanes) go through a
// zero-padded copy, since AVX2 has no masked 16-bit loads or stores.
struct V {
  using F = __m256;
  static constexpr int kLanes = 8;
  static __m256i mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F max_active(F acc, F v, int n) { return _mm256_blendv_ps(acc, _mm256_max_ps(acc, v), _mm256_castsi256_ps(mask(n))); }
  static F keep_active(F v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(mask(n))); }
  // v, with 0 in the lanes where x < limit (NaN x keeps v)
  static F zero_below(F v, F x, float limit) { return _mm256_and_ps(v, _mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_NLT_UQ)); }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127] (exp_v's clamp keeps it there): n added to the exponent field.
  static F scale2(F p, F n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static F recip(F d) { return _mm256_div_ps(_mm256_set1_ps(1.0f), d); }
  static float sum(F v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  // Lane i: the sum of s[i]'s lanes (horizontal adds within 128-bit lanes, then the two halves added).
  static F sums(const F* s) {
    const F lo = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    const F hi = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  static float top(F v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  static F loadf(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void storef(float* p, int n, F v) { _mm256_maskstore_ps(p, mask(n), v); }
  static F load(const void* p, int64_t i, int n, bool bf16) {
    if (!bf16) return loadf(static_cast<const float*>(p) + i, n);
    const uint16_t* src = static_cast<const uint16_t*>(p) + i;
    uint16_t tmp[8] = {};
    if (n < 8) src = static_cast<const uint16_t*>(std::memcpy(tmp, src, n * sizeof(uint16_t)));
    return bf16x8_to_fp32(src);
  }
  static void store(void* p, int64_t i, int n, F v, bool bf16) {
    if (!bf16) return storef(static_cast<float*>(p) + i, n, v);
    uint16_t* dst = static_cast<uint16_t*>(p) + i;
    if (n == 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bf16x8(v));
    uint16_t tmp[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), bf16x8(v));
    std::memcpy(dst, tmp, n * sizeof(uint16_t));
  }
};

#include "fused.h"

static void fill_kernels(Kernels& k) {
  k.float_blocks[kBF16][0] = &float_blocks<kBF16, 1, 4>;
  k.float_blocks[kBF16][1] = &float_blocks<kBF16, 2, 2>;
  k.float_blocks[kBF16][2] = &float_blocks<kBF16, 4, 1>;
  k.float_blocks[kF16][0] = &float_blocks<kF16, 1, 4>;
  k.float_blocks[kF16][1] = &float_blocks<kF16, 2, 2>;
  k.float_blocks[kF16][2] = &float_blocks<kF16, 4, 1>;
  k.float_blocks[kF32][0] = &float_blocks<kF32, 1, 4>;
  k.float_blocks[kF32][1] = &float_blocks<kF32, 2, 2>;
  k.float_blocks[kF32][2] = &float_blocks<kF32, 4, 1>;
  k.quant_blocks[kInt8][0] = &quant_blocks<kInt8, 1, 2>;
  k.quant_blocks[kInt8][1] = &quant_blocks<kInt8, 2, 1>;
  k.quant_blocks[kInt8][2] = &quant_blocks<kInt8, 4, 1>;
  k.quant_blocks[kInt4][0] = &quant_blocks<kInt4, 1, 2>;
  k.quant_blocks[kInt4][1] = &quant_blocks<kInt4, 2, 1>;
  k.quant_blocks[kInt4][2] = &quant_blocks<kInt4, 4, 1>;
  const int fs[3] = {4, 2, 1}, qs[3] = {2, 1, 1};
  for (int i = 0; i < 3; ++i) k.float_streams[i] = fs[i], k.quant_streams[i] = qs[i];
  k.float_unpack[kBF16] = &float_unpack<kBF16>;
  k.float_unpack[kF16] = &float_unpack<kF16>;
  k.float_unpack[kF32] = &float_unpack<kF32>;
  k.quant_unpack[kInt8] = &quant_unpack<kInt8>;
  k.quant_unpack[kInt4] = &quant_unpack<kInt4>;
  k.prep_digits = nullptr;
  k.read_streams = &read_streams;
  fill_fused(k);
}

}  // namespace avx2
#pragma GCC pop_options

// ----------------------------------------------------------------------------------------------------------
// Run-time selection (baseline x86-64).
// ----------------------------------------------------------------------------------------------------------
bool cpu_has(const char* feature) {
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(feature, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  if (std::strcmp(feature, "avx512bf16") == 0) return __builtin_cpu_supports("avx512bf16");
  return false;
}

const Kernels& kernels_for(int isa) {
  // Filling a table only takes addresses: safe on any CPU.
  static const Kernels k256 = [] {
    Kernels k{};
    avx2::fill_kernels(k);
    return k;
  }();
  static const Kernels k512 = [] {
    Kernels k{};
    avx512::fill_kernels(k);
    if (cpu_has("avx512bf16")) avx512bf16::fill_kernels(k);
    k.read_streams = k256.read_streams;
    return k;
  }();
  return isa == kIsaAvx512 ? k512 : k256;
}

}  // namespace polylm_gemv
