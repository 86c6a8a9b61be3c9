// Interface between the torch-free SIMD kernels (kernels.cpp) and the torch driver (gemv.cpp).
//
// Layout (written by _layout.py): the weight is cut into blocks of 16 output rows; each block is one
// contiguous run of 64-byte chunks, and chunk c holds, for each of the 16 rows, the 4 bytes of that row's next
// k-values (bf16: a pair, fp32: one value, int8: 4 values stored +128, int4: 8 nibbles; fp16 chunks hold k0 for
// rows 0..15 then k1 for rows 0..15 so that vcvtph2ps yields a row vector). A SIMD lane is one output row, so
// there are no horizontal reductions and each block is one sequential stream. Group scales are stored
// [block][group][16].
#pragma once

#include <cstdint>

namespace polylm_gemv {

constexpr int kRows = 16;            // output rows per block (one AVX-512 vector of fp32)
constexpr int kChunkBytes = 64;      // bytes per block per k-chunk: 16 rows x 4 bytes
constexpr int kMaxM = 16;            // x rows per kernel pass (at most; 8 and 16 only on AVX-512)
constexpr int kSlots = 5;            // kernels for M = 1, 2, 4, 8, 16 rows of x
constexpr int kMaxStreams = 8;
constexpr int kGemmBlocks = 4;      // weight blocks (64 output columns) per GEMM register tile
constexpr int kGemmRows = 6;        // x rows per GEMM register tile (6 x 4 accumulators)

enum Isa : int { kIsaNone = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
enum FloatKind : int { kBF16 = 0, kF16 = 1, kF32 = 2 };
enum QuantKind : int { kInt8 = 0, kInt4 = 1 };
enum GatedAct : int { kSilu = 0, kGeluTanh = 1 };

constexpr int chunk_k(int float_kind) { return float_kind == kF32 ? 1 : 2; }
constexpr int quant_chunk_k(int quant_kind) { return quant_kind == kInt8 ? 4 : 8; }
// Kernels exist for M = 1, 2, 4 (every ISA), 8 and 16 rows (some ISAs, null slots elsewhere); 3 rows run the
// 4-row kernel with a zero row. Slot i holds the kernel for 2^i rows.
constexpr int kernel_m(int64_t rows) { return rows == 3 ? 4 : static_cast<int>(rows); }
constexpr int m_slot(int m) { return m == 16 ? 4 : m == 8 ? 3 : m == 4 ? 2 : m - 1; }

// Balanced base-256 digits of the fixed-point activation of the VNNI path: x_q = e0 + 256 e1 + 65536 e2 with
// every e in [-128, 127]; the largest magnitude representable on both sides is 127 * 65793.
constexpr int kDigits = 3;
constexpr float kDigitMax = 127.0f * 65793.0f;

struct FloatArgs {
  const uint8_t* w;  // packed blocks
  int64_t nchunks;   // chunks per block
  const void* x;     // fp32 [M][ldx] (bf16 pairs as int32 words for the dot-product path)
  int64_t ldx;       // elements (words for the dot-product path) per x row
  const float* bias; // [N_pad], zeros when there is no bias
  float* y;          // [M][ldy]
  int64_t ldy;
};

struct QuantArgs {
  const uint8_t* w;  // packed blocks
  int64_t chunks_per_group;
  int64_t ngroups;
  const void* scales;      // [NB][NG][16] fp32 (int8) or bf16 (int4)
  const int32_t* xdigits;  // AVX-512: [M][3][ldx] int32 words of 4 signed digits
  const int32_t* corr;     // AVX-512: [M][NG][3] zero_point * sum of the digits over the group
  const float* x;          // AVX2: [M][ldx] fp32
  int64_t ldx;             // words per digit row (AVX-512) or floats per x row (AVX2)
  const float* sx;         // AVX-512: [M] activation scale
  const float* bias;
  float* y;
  int64_t ldy;
};

// Dequantize/unpack blocks [b, b_end) into a K x ldw row-major matrix (the transposed weight) of fp32 or bf16:
// column (blk - b0) * 16 + r holds row r of block blk; only k < K is written.
struct UnpackArgs {
  const uint8_t* w;
  int64_t nchunks;  // float kinds: chunks per block
  int64_t chunks_per_group;
  int64_t ngroups;
  const void* scales;
  int64_t K;
  void* out;
  int64_t ldw;
  bool out_bf16;
};

// The large-M path on CPUs with AVX512-BF16: a register-tiled GEMM straight on bf16 blocks (the packed bf16
// weight itself, or a panel of int8/int4 blocks dequantized to that layout), x as bf16 pairs.
struct GemmArgs {
  int64_t nchunks;   // chunks per block in the weight passed (the block stride is nchunks * 64 bytes)
  int64_t kchunks;   // chunks to multiply: x words per row, <= nchunks
  const int32_t* x;  // [M][ldx] bf16 pairs
  int64_t ldx;
  int64_t M;
  const float* bias;  // [N_pad] by output column
  void* y;            // [M][ldy] fp32 or bf16; only columns < N are written
  int64_t ldy;
  int64_t N;
  bool y_bf16;
};

// A kernel computes the S blocks blk[0..S) (indices may repeat) for all M rows of x.
using FloatFn = void (*)(const FloatArgs&, const int64_t* blk);
using QuantFn = void (*)(const QuantArgs&, const int64_t* blk);
using UnpackFn = void (*)(const UnpackArgs&, int64_t b0, int64_t b, int64_t b_end);
// Dequantizes blocks [b, b_end) into bf16 blocks of K_pad / 2 chunks each (zeros for k >= K) at `out`.
using DequantBf16Fn = void (*)(const UnpackArgs&, int64_t b, int64_t b_end, uint8_t* out);
// out[r][i] = act(h[r][i]) * h[r][inter + i] for rows [r0, r1) of h [rows][2 * inter] (fp32 or bf16, like out
// [rows][inter]), computed in fp32 and rounded once.
using GatedFn = void (*)(const void* h, void* out, int64_t inter, int64_t r0, int64_t r1, int act, bool bf16);
// RMSNorm of a residual sum for rows [r0, r1) of [rows][hidden] tensors (fp32 or bf16): res = x + delta
// (rounded to the dtype; delta null: res is x and is not written), out = res * rsqrt(mean(res^2) + eps) * w (+ b),
// in fp32 with one rounding at the end; w and b are fp32 [hidden], b may be null.
using RmsFn = void (*)(const void* x, const void* delta, void* res, const float* w, const float* b, void* out,
                       int64_t hidden, int64_t r0, int64_t r1, float eps, bool bf16);
// Attention of a few query rows over a KV cache, fp32 math (see AttentionArgs); computes the (batch, head,
// query) units [u0, u1), unit = (b * heads + h) * T + t.
struct AttentionArgs {
  const void* q;       // [B][H][T][d]
  const void* keys;    // [B][KVH][cap][d]
  const void* values;  // [B][KVH][cap][d]
  const void* bias;    // [B][bias_heads][T][L] additive (bias_heads 1 or H)
  void* out;           // [B][T][H * d]
  int64_t heads, kv_heads, T, d, cap, L, bias_heads;
  int64_t chunk;   // heads of a group (sharing one key/value head) per unit of work
  float scale;
  float softcap;   // > 0: scores capped to softcap * tanh(score / softcap) before the bias; 0: not capped
  bool bf16;       // q, keys, values and out are bf16 (else fp32)
  bool bias_bf16;  // bias is bf16 (else fp32)
};
// Units u0..u1 of B x T x KVH x ceil(group / chunk); scratch: attention_scratch floats.
using AttentionFn = void (*)(const AttentionArgs&, int64_t u0, int64_t u1, float* scratch);
constexpr int64_t attention_scratch(int64_t chunk, int64_t L, int64_t d) {
  return chunk * L + (2 * chunk + 16) * ((d + 15) / 16 * 16);
}
// Computes output blocks [b, b_end) for all M rows; `w` points at block b, the next blocks follow it.
using GemmFn = void (*)(const GemmArgs&, const uint8_t* w, int64_t b, int64_t b_end);
// Turns one zero-padded fp32 activation row into digits and corrections (AVX-512 quant path).
using PrepFn = void (*)(const float* x, int64_t kpad, int64_t group, int zero_point, int8_t* digits, int32_t* corr,
                        float* sx);

struct Kernels {
  // Each kernel computes S blocks per call; streams[slot] is that S.
  FloatFn float_blocks[3][kSlots];   // [kind][m_slot]
  FloatFn bf16_dot_blocks[kSlots];   // bf16 activations x bf16 weights (AVX512-BF16); null where unsupported
  QuantFn quant_blocks[2][kSlots];   // [quant kind][m_slot]
  int float_streams[kSlots];
  int dot_streams[kSlots];
  int quant_streams[kSlots];
  UnpackFn float_unpack[3];
  UnpackFn quant_unpack[2];
  DequantBf16Fn quant_to_bf16[2];  // AVX-512 only
  GemmFn bf16_gemm;                // AVX512-BF16 only; null where unsupported
  GatedFn gated;                   // fused elementwise kernels and decode attention (fused.h)
  RmsFn add_rms_norm;
  AttentionFn attention;
  PrepFn prep_digits;           // null on AVX2 (weights are converted to fp32 there instead)
  // Memory-read baseline for benchmarks: reads [p, p + bytes) as `streams` lockstep streams.
  uint64_t (*read_streams)(const uint8_t* p, int64_t bytes, int streams);
};

// Whether the CPU supports "avx2" (with FMA, F16C), "avx512" (F/BW/VL/DQ/VNNI) or "avx512bf16".
bool cpu_has(const char* feature);
// The kernel table of an ISA; only call for an ISA the CPU has.
const Kernels& kernels_for(int isa);

}  // namespace polylm_gemv
