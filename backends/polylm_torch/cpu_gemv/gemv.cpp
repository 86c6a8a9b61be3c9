// torch side of the polylm cpu_gemv extension: x preparation, threading (at::parallel_for, i.e. torch's own
// OpenMP pool), the large-M path and the Python bindings. The SIMD kernels are in kernels.cpp.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace polylm_gemv {

// ----------------------------------------------------------------------------------------------------------
// Generic driver code (baseline x86-64 target).
// ----------------------------------------------------------------------------------------------------------

// Per-thread scratch for activations and partial outputs: grows, never shrinks, 64-byte aligned.
static uint8_t* scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// One kernel pass: a group of x rows (its Args) and the kernel for that many rows, which computes S blocks per
// call.
template <class Args>
struct Pass {
  Args args;
  void (*kernel)(const Args&, const int64_t*);
  int S;
};

// Runs the passes over all blocks: each thread takes a contiguous range of blocks and walks `streams` (the
// largest S) sub-ranges of it in lockstep (long sequential streams); the few leftover blocks go `streams` at a
// time, the last repeated. Every pass runs on a set of blocks before the next set is loaded, so the weights come
// from memory once and from L1/L2 for the other passes; a pass with a smaller S covers the set in several calls.
template <class Args>
static void run_blocks(const std::vector<Pass<Args>>& passes, int64_t nblocks, int64_t block_bytes) {
  int streams = 1;
  for (const Pass<Args>& p : passes) streams = std::max(streams, p.S);
  // At least 256 KB per thread: splitting a small matrix costs more in wake-ups than it saves, and on a
  // busy machine a second thread may not get a core at all.
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(block_bytes, 1));
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t per = (end - begin) / streams;
    int64_t blk[kMaxStreams];
    const auto run = [&] {
      for (const Pass<Args>& p : passes)
        for (int s = 0; s < streams; s += p.S) p.kernel(p.args, blk + s);
    };
    for (int64_t i = 0; i < per; ++i) {
      for (int s = 0; s < streams; ++s) blk[s] = begin + s * per + i;
      run();
    }
    for (int64_t b = begin + streams * per; b < end; b += streams) {
      for (int s = 0; s < streams; ++s) blk[s] = std::min(b + s, end - 1);
      run();
    }
  });
}

// The x rows of each kernel pass over M rows (at most 4 rows: one pass, 3 rows padded to 4; more: M rounded up
// to a multiple of 4 and split into the largest passes that `kernels` has, e.g. 28 = 16 + 8 + 4), and their sum
// (x is padded with zero rows to it). kernels[slot] is null where the ISA has no kernel for that many rows.
template <class Fn>
static std::pair<std::vector<int>, int64_t> pass_rows(int64_t M, const Fn* kernels) {
  if (M <= 4) return {{kernel_m(M)}, kernel_m(M)};
  std::vector<int> rows;
  int64_t left = round_up(M, 4);
  for (int gm = kMaxM; gm >= 4; gm /= 2)
    if (kernels[m_slot(gm)] != nullptr)
      for (; left >= gm; left -= gm) rows.push_back(gm);
  return {rows, round_up(M, 4)};
}

// Converts the rows of x2 [rows, K] to fp32 (zero padded to kpad) in dst, rows ld floats apart.
static void x_to_fp32(const at::Tensor& x2, int64_t rows, int64_t K, int64_t kpad, int64_t ld, float* dst) {
  for (int64_t m = 0; m < rows; ++m) {
    float* d = dst + m * ld;
    switch (x2.scalar_type()) {
      case at::kFloat: std::memcpy(d, x2.const_data_ptr<float>() + m * K, K * sizeof(float)); break;
      case at::kBFloat16: {
        const c10::BFloat16* s = x2.const_data_ptr<c10::BFloat16>() + m * K;
        for (int64_t k = 0; k < K; ++k) d[k] = static_cast<float>(s[k]);
        break;
      }
      case at::kHalf: {
        const c10::Half* s = x2.const_data_ptr<c10::Half>() + m * K;
        for (int64_t k = 0; k < K; ++k) d[k] = static_cast<float>(s[k]);
        break;
      }
      default: TORCH_CHECK(false, "polylm cpu_gemv: unsupported activation dtype ", x2.scalar_type());
    }
    std::fill(d + K, d + kpad, 0.0f);
  }
}

// Writes y rows (fp32, row stride ldy) into the first `rows` rows of an [M, N] tensor of any float dtype.
static void store_output(const float* y, int64_t ldy, int64_t rows, at::Tensor& out, int64_t N) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* s = y + m * ldy;
    switch (out.scalar_type()) {
      case at::kFloat: std::memcpy(out.data_ptr<float>() + m * N, s, N * sizeof(float)); break;
      case at::kBFloat16: {
        c10::BFloat16* d = out.data_ptr<c10::BFloat16>() + m * N;
        for (int64_t n = 0; n < N; ++n) d[n] = c10::BFloat16(s[n]);
        break;
      }
      case at::kHalf: {
        c10::Half* d = out.data_ptr<c10::Half>() + m * N;
        for (int64_t n = 0; n < N; ++n) d[n] = c10::Half(s[n]);
        break;
      }
      default: TORCH_CHECK(false, "polylm cpu_gemv: unsupported output dtype ", out.scalar_type());
    }
  }
}

static std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// Shared state and the large-M path of both weight kinds: dequantize a tile of row blocks into a transposed
// [K, T] matrix (fp32, or bf16 where the CPU multiplies bf16 natively) and multiply it with at::mm.
class GemvBase {
 public:
  GemvBase(at::Tensor packed, int64_t N, int64_t K, std::optional<at::Tensor> bias, int isa, int64_t kernel_rows)
      : packed_(std::move(packed)), N_(N), K_(K), isa_(isa), kernel_rows_(kernel_rows) {
    TORCH_CHECK(isa == kIsaAvx2 || isa == kIsaAvx512, "polylm cpu_gemv: unknown isa ", isa);
    TORCH_CHECK(cpu_has(isa == kIsaAvx512 ? "avx512" : "avx2"), "polylm cpu_gemv: this CPU lacks the requested ISA");
    TORCH_CHECK(packed_.is_contiguous() && packed_.device().is_cpu(), "polylm cpu_gemv: packed weight must be a contiguous CPU tensor");
    n_pad_ = round_up(N, kRows);
    nblocks_ = n_pad_ / kRows;
    bias_ = at::empty({n_pad_}, at::TensorOptions().dtype(at::kFloat));
    float* b = bias_.data_ptr<float>();
    std::fill(b, b + n_pad_, 0.0f);
    if (bias.has_value() && bias->defined()) {
      at::Tensor bb = bias->to(at::kFloat).contiguous();
      TORCH_CHECK(bb.numel() == N, "polylm cpu_gemv: bias has ", bb.numel(), " elements, expected ", N);
      std::memcpy(b, bb.const_data_ptr<float>(), N * sizeof(float));
    }
    native_bf16_ = isa == kIsaAvx512 && cpu_has("avx512bf16");
    kernels_ = &kernels_for(isa);
  }
  virtual ~GemvBase() = default;

  at::Tensor forward(const at::Tensor& x) {
    // Typed errors for the Python caller (raised after the GIL is re-acquired).
    if (!x.device().is_cpu()) throw pybind11::value_error("cpu_gemv layer: input must be on the CPU");
    if (x.dim() == 0 || x.size(-1) != K_)
      throw pybind11::value_error("cpu_gemv layer: input has last dimension " +
                                  (x.dim() ? std::to_string(x.size(-1)) : std::string("None")) + ", expected " +
                                  std::to_string(K_));
    const auto dt = x.scalar_type();
    if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf)
      throw pybind11::type_error(std::string("cpu_gemv layer: input must be float32, bfloat16 or float16, got ") +
                                 c10::toString(dt));
    const at::Tensor x2 = x.reshape({-1, K_}).contiguous();
    const int64_t M = x2.size(0);
    at::Tensor out = at::empty({M, N_}, x.options());
    if (M > 0 && N_ > 0) {
      if (M <= kernel_rows_) {
        small_m(x2, out);
      } else {
        large_m(x2, out);
      }
    }
    return out.view(out_shape(x, N_));
  }

  // The (dequantized) weight as an [N, K] tensor: fp32, or bf16 when it is stored as bf16.
  at::Tensor unpacked() const {
    const bool bf16 = stored_bf16();
    at::Tensor wt = at::empty({K_, n_pad_}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    unpack_range(0, nblocks_, wt, bf16);
    return wt.narrow(1, 0, N_).t().contiguous();
  }

  int64_t in_features() const { return K_; }
  int64_t out_features() const { return N_; }

 protected:
  // The kernel path for all M rows of x2 (M <= kernel_rows_).
  virtual void small_m(const at::Tensor& x2, at::Tensor& out) = 0;
  virtual UnpackArgs unpack_args() const = 0;
  virtual UnpackFn unpacker() const = 0;
  virtual bool stored_bf16() const { return false; }
  virtual int64_t block_bytes() const = 0;

  void unpack_range(int64_t b0, int64_t b1, at::Tensor& wt, bool bf16) const {
    UnpackArgs ua = unpack_args();
    ua.out = wt.data_ptr();
    ua.ldw = wt.size(1);
    ua.out_bf16 = bf16;
    const UnpackFn fn = unpacker();
    const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(block_bytes(), 1));
    at::parallel_for(b0, b1, grain, [&](int64_t b, int64_t e) { fn(ua, b0, b, e); });
  }

  void large_m(const at::Tensor& x2, at::Tensor& out) {
    // bf16 arithmetic only for bf16 x on CPUs with native bf16 dot products, and only for weights that a bf16
    // model would hold anyway: bf16 (exact) or dequantized int8/int4 (rounded once). fp16/fp32 weights: fp32.
    const bool bf16 = x2.scalar_type() == at::kBFloat16 && native_bf16_ && bf16_compute_ok();
    if (bf16 && kernels_->bf16_gemm != nullptr) {
      gemm(x2, out);
      return;
    }
    const auto cdt = bf16 ? at::kBFloat16 : at::kFloat;
    const at::Tensor xc = x2.to(cdt);
    at::Tensor oc = out.scalar_type() == cdt ? out : at::empty(out.sizes(), out.options().dtype(cdt));
    const int64_t esize = bf16 ? 2 : 4;
    const int64_t tile_blocks = std::clamp<int64_t>((int64_t{2} << 20) / (K_ * esize * kRows), 1, nblocks_);
    at::Tensor wt = at::empty({K_, tile_blocks * kRows}, at::TensorOptions().dtype(cdt));
    const at::Tensor bias_c = bias_.to(cdt);
    for (int64_t b0 = 0; b0 < nblocks_; b0 += tile_blocks) {
      const int64_t b1 = std::min(nblocks_, b0 + tile_blocks);
      const int64_t n0 = b0 * kRows, n1 = std::min(N_, b1 * kRows);
      unpack_range(b0, b1, wt, bf16);
      at::Tensor dst = oc.narrow(1, n0, n1 - n0);
      at::addmm_out(dst, bias_c.narrow(0, n0, n1 - n0), xc, wt.narrow(1, 0, n1 - n0));
    }
    if (!oc.is_same(out)) out.copy_(oc);
  }

  // The register-tiled bf16 GEMM on the packed blocks (no unpacked copy of the weight): each thread takes
  // whole panels of kGemmBlocks blocks; x is used in place unless K is odd (then padded to whole pairs).
  void gemm(const at::Tensor& x2, at::Tensor& out) {
    const int64_t M = x2.size(0), words = (K_ + 1) / 2;
    at::Tensor xp = x2;
    if (K_ % 2) {
      xp = at::zeros({M, 2 * words}, x2.options());
      xp.narrow(1, 0, K_).copy_(x2);
    }
    GemmArgs g{};
    g.kchunks = words;
    g.x = static_cast<const int32_t*>(xp.const_data_ptr());
    g.ldx = words;
    g.M = M;
    g.bias = bias_.const_data_ptr<float>();
    g.y = out.data_ptr();
    g.ldy = N_;
    g.N = N_;
    g.y_bf16 = out.scalar_type() == at::kBFloat16;
    const int64_t panels = (nblocks_ + kGemmBlocks - 1) / kGemmBlocks;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      gemm_blocks(g, p0 * kGemmBlocks, std::min(nblocks_, p1 * kGemmBlocks));
    });
  }

  // The GEMM over blocks [b, b_end) (g.nchunks is set here).
  virtual void gemm_blocks(GemmArgs g, int64_t b, int64_t b_end) const = 0;
  virtual bool bf16_compute_ok() const = 0;

  at::Tensor packed_, bias_;
  int64_t N_, K_, n_pad_, nblocks_;
  int isa_;
  int64_t kernel_rows_;
  bool native_bf16_ = false;
  const Kernels* kernels_ = nullptr;
};

// Scratch for the kernel path: x rows padded to `mk` with zero rows; y goes straight into `out` when it is fp32,
// unpadded and every row is real, else into scratch and is converted afterwards.
struct PassBuffers {
  uint8_t* x;
  float* y;
  int64_t ldy;
  bool direct;
};

static PassBuffers pass_buffers(size_t x_bytes, int64_t M, int64_t mk, at::Tensor& out, int64_t N, int64_t n_pad) {
  const bool direct = out.scalar_type() == at::kFloat && N == n_pad && mk == M;
  const size_t xb = static_cast<size_t>(round_up(static_cast<int64_t>(x_bytes), 64));
  uint8_t* buf = scratch(xb + (direct ? 0 : static_cast<size_t>(mk * n_pad) * sizeof(float)));
  std::memset(buf, 0, x_bytes);
  if (direct) return {buf, out.data_ptr<float>(), N, true};
  return {buf, reinterpret_cast<float*>(buf + xb), n_pad, false};
}

class FloatGemv : public GemvBase {
 public:
  // packed: [NB, nchunks, 64 bytes] of bf16 / fp16 / fp32 (see _layout.pack_float).
  FloatGemv(at::Tensor packed, int64_t N, int64_t K, std::optional<at::Tensor> bias, int isa, int64_t kernel_rows)
      : GemvBase(std::move(packed), N, K, std::move(bias), isa, kernel_rows) {
    switch (packed_.scalar_type()) {
      case at::kBFloat16: kind_ = kBF16; break;
      case at::kHalf: kind_ = kF16; break;
      case at::kFloat: kind_ = kF32; break;
      default: TORCH_CHECK(false, "polylm cpu_gemv: packed weight dtype ", packed_.scalar_type(), " unsupported");
    }
    kpad_ = round_up(K, chunk_k(kind_));
    nchunks_ = kpad_ / chunk_k(kind_);
    TORCH_CHECK(packed_.numel() * packed_.element_size() == nblocks_ * nchunks_ * kChunkBytes,
                "polylm cpu_gemv: packed weight has ", packed_.numel() * packed_.element_size(), " bytes, expected ",
                nblocks_ * nchunks_ * kChunkBytes);
    use_dot_ = kind_ == kBF16 && kernels_->bf16_dot_blocks[0] != nullptr;
  }

 protected:
  void small_m(const at::Tensor& x2, at::Tensor& out) override {
    const int64_t M = x2.size(0);
    // bf16 x bf16 uses vdpbf16ps on bf16 pairs; everything else multiplies in fp32.
    const bool dot = use_dot_ && x2.scalar_type() == at::kBFloat16;
    const FloatFn* fns = dot ? kernels_->bf16_dot_blocks : kernels_->float_blocks[kind_];
    const int* streams = dot ? kernels_->dot_streams : kernels_->float_streams;
    const auto [rows, mk] = pass_rows(M, fns);
    // x rows are a cache line more than a multiple of 64 bytes apart: with rows a multiple of 4 KB apart, the
    // 8-16 rows a kernel broadcasts from would share one L1 set and evict each other.
    const int64_t xstride = round_up(kpad_ * (dot ? 2 : 4), 64) + 64;  // bytes
    const PassBuffers pb = pass_buffers(static_cast<size_t>(mk * xstride), M, mk, out, N_, n_pad_);
    if (dot) {
      for (int64_t m = 0; m < M; ++m)
        std::memcpy(pb.x + m * xstride, x2.const_data_ptr<c10::BFloat16>() + m * K_, K_ * 2);
    } else {
      x_to_fp32(x2, M, K_, kpad_, xstride / 4, reinterpret_cast<float*>(pb.x));
    }
    std::vector<Pass<FloatArgs>> passes;
    int64_t m0 = 0;
    for (const int gm : rows) {
      FloatArgs a{};
      a.w = static_cast<const uint8_t*>(packed_.const_data_ptr());
      a.nchunks = nchunks_;
      a.bias = bias_.const_data_ptr<float>();
      a.ldx = xstride / 4;  // floats, or words of bf16 pairs
      a.x = pb.x + m0 * xstride;
      a.y = pb.y + m0 * pb.ldy;
      a.ldy = pb.ldy;
      passes.push_back({a, fns[m_slot(gm)], streams[m_slot(gm)]});
      m0 += gm;
    }
    run_blocks(passes, nblocks_, block_bytes());
    if (!pb.direct) store_output(pb.y, pb.ldy, M, out, N_);
  }

  UnpackArgs unpack_args() const override {
    UnpackArgs ua{};
    ua.w = static_cast<const uint8_t*>(packed_.const_data_ptr());
    ua.nchunks = nchunks_;
    ua.K = K_;
    return ua;
  }
  UnpackFn unpacker() const override { return kernels_->float_unpack[kind_]; }
  void gemm_blocks(GemmArgs g, int64_t b, int64_t b_end) const override {
    g.nchunks = nchunks_;
    kernels_->bf16_gemm(g, static_cast<const uint8_t*>(packed_.const_data_ptr()) + b * block_bytes(), b, b_end);
  }
  bool stored_bf16() const override { return kind_ == kBF16; }
  bool bf16_compute_ok() const override { return kind_ == kBF16; }
  int64_t block_bytes() const override { return nchunks_ * kChunkBytes; }

 private:
  int kind_ = kBF16;
  int64_t kpad_ = 0, nchunks_ = 0;
  bool use_dot_ = false;
};

class QuantGemv : public GemvBase {
 public:
  // packed: [NB, K_pad / chunk_k, 64] uint8; scales: [NB, NG, 16] fp32 (int8) or bf16 (int4).
  // group: k-values per group (K rounded up to 16 for per-channel int8).
  QuantGemv(at::Tensor packed, at::Tensor scales, int kind, int64_t group, int64_t N, int64_t K,
            std::optional<at::Tensor> bias, int isa, int64_t kernel_rows)
      : GemvBase(std::move(packed), N, K, std::move(bias), isa, kernel_rows),
        scales_(std::move(scales)), kind_(kind), group_(group) {
    TORCH_CHECK(kind == kInt8 || kind == kInt4, "polylm cpu_gemv: unknown quantization kind ", kind);
    TORCH_CHECK(group % 16 == 0 && group > 0, "polylm cpu_gemv: group size ", group, " is not a multiple of 16");
    // Integer dot products per digit and group stay below 2^31: group * 255 * 128.
    TORCH_CHECK(group <= 65536, "polylm cpu_gemv: group of ", group, " values would overflow int32 accumulators");
    kpad_ = round_up(K, group);
    ngroups_ = kpad_ / group;
    TORCH_CHECK(packed_.scalar_type() == at::kByte &&
                    packed_.numel() == nblocks_ * (kpad_ / quant_chunk_k(kind)) * kChunkBytes,
                "polylm cpu_gemv: packed quantized weight has the wrong dtype or size");
    TORCH_CHECK(scales_.is_contiguous() && scales_.numel() == nblocks_ * ngroups_ * kRows &&
                    scales_.scalar_type() == (kind == kInt8 ? at::kFloat : at::kBFloat16),
                "polylm cpu_gemv: scales have the wrong dtype or size");
  }

 protected:
  void small_m(const at::Tensor& x2, at::Tensor& out) override {
    const int64_t M = x2.size(0);
    const auto [rows, mk] = pass_rows(M, kernels_->quant_blocks[kind_]);
    const bool digits = kernels_->prep_digits != nullptr;
    // x: fp32 [mk][kpad] | digits [mk][3][kpad] | corrections [mk][NG][3] | sx [mk]
    const int64_t xf = round_up(mk * kpad_ * 4, 64);
    const int64_t dg = digits ? round_up(mk * kDigits * kpad_, 64) : 0;
    const int64_t cr = round_up(mk * ngroups_ * kDigits * 4, 64);
    const PassBuffers pb = pass_buffers(static_cast<size_t>(xf + dg + cr + mk * 4), M, mk, out, N_, n_pad_);
    float* xfp = reinterpret_cast<float*>(pb.x);
    int8_t* dig = reinterpret_cast<int8_t*>(pb.x + xf);
    int32_t* corr = reinterpret_cast<int32_t*>(pb.x + xf + dg);
    float* sx = reinterpret_cast<float*>(pb.x + xf + dg + cr);
    x_to_fp32(x2, M, K_, kpad_, kpad_, xfp);
    if (digits) {
      const int zero_point = kind_ == kInt8 ? 128 : 8;
      for (int64_t m = 0; m < mk; ++m)
        kernels_->prep_digits(xfp + m * kpad_, kpad_, group_, zero_point, dig + m * kDigits * kpad_,
                              corr + m * ngroups_ * kDigits, sx + m);
    }
    std::vector<Pass<QuantArgs>> passes;
    int64_t m0 = 0;
    for (const int gm : rows) {
      QuantArgs a{};
      a.w = packed_.const_data_ptr<uint8_t>();
      a.chunks_per_group = group_ / quant_chunk_k(kind_);
      a.ngroups = ngroups_;
      a.scales = scales_.const_data_ptr();
      a.bias = bias_.const_data_ptr<float>();
      a.y = pb.y + m0 * pb.ldy;
      a.ldy = pb.ldy;
      if (digits) {
        a.xdigits = reinterpret_cast<const int32_t*>(dig + m0 * kDigits * kpad_);
        a.corr = corr + m0 * ngroups_ * kDigits;
        a.sx = sx + m0;
        a.ldx = kpad_ / 4;
      } else {
        a.x = xfp + m0 * kpad_;
        a.ldx = kpad_;
      }
      passes.push_back({a, kernels_->quant_blocks[kind_][m_slot(gm)], kernels_->quant_streams[m_slot(gm)]});
      m0 += gm;
    }
    run_blocks(passes, nblocks_, block_bytes());
    if (!pb.direct) store_output(pb.y, pb.ldy, M, out, N_);
  }

  UnpackArgs unpack_args() const override {
    UnpackArgs ua{};
    ua.w = packed_.const_data_ptr<uint8_t>();
    ua.chunks_per_group = group_ / quant_chunk_k(kind_);
    ua.ngroups = ngroups_;
    ua.scales = scales_.const_data_ptr();
    ua.K = K_;
    return ua;
  }
  UnpackFn unpacker() const override { return kernels_->quant_unpack[kind_]; }
  // Dequantizes one register-tile panel at a time into per-thread scratch (L2-sized), then multiplies it.
  void gemm_blocks(GemmArgs g, int64_t b, int64_t b_end) const override {
    g.nchunks = kpad_ / 2;
    const UnpackArgs ua = unpack_args();
    uint8_t* panel = scratch(static_cast<size_t>(kGemmBlocks * g.nchunks * kChunkBytes));
    for (int64_t b0 = b; b0 < b_end; b0 += kGemmBlocks) {
      const int64_t b1 = std::min(b_end, b0 + kGemmBlocks);
      kernels_->quant_to_bf16[kind_](ua, b0, b1, panel);
      kernels_->bf16_gemm(g, panel, b0, b1);
    }
  }
  bool bf16_compute_ok() const override { return true; }
  int64_t block_bytes() const override { return kpad_ / quant_chunk_k(kind_) * kChunkBytes; }

 private:
  at::Tensor scales_;
  int kind_;
  int64_t group_, kpad_ = 0, ngroups_ = 0;
};

// Reads all bytes of a tensor on torch's thread pool, each thread as `streams` sequential streams: the
// same-run memory bandwidth ceiling that benchmarks compare the kernels with.
static int64_t stream_read(const at::Tensor& t, int64_t streams) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "stream_read: need a contiguous CPU tensor");
  TORCH_CHECK(streams >= 1 && streams <= kMaxStreams, "stream_read: streams must be in 1..", kMaxStreams);
  const uint8_t* p = static_cast<const uint8_t*>(t.const_data_ptr());
  const int64_t lines = t.numel() * t.element_size() / kChunkBytes;
  const auto read = kernels_for(kIsaAvx2).read_streams;
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, lines, 1024, [&](int64_t b, int64_t e) {
    seen.fetch_or(read(p + b * kChunkBytes, (e - b) * kChunkBytes, static_cast<int>(streams)));
  });
  return static_cast<int64_t>(seen.load() & 0x7FFFFFFF);
}

// The fused kernels (fused.h) of an ISA this CPU has.
static const Kernels& fused_kernels(int64_t isa) {
  TORCH_CHECK(isa == kIsaAvx2 || isa == kIsaAvx512, "polylm cpu_gemv: unknown isa ", isa);
  TORCH_CHECK(cpu_has(isa == kIsaAvx512 ? "avx512" : "avx2"), "polylm cpu_gemv: this CPU lacks the requested ISA");
  return kernels_for(static_cast<int>(isa));
}

// act(gate) * up over the halves of h [..., 2 * inter] (fp32 or bf16); act: GatedAct.
static at::Tensor gated_activation(const at::Tensor& h, int64_t act, int64_t isa) {
  const auto fn = fused_kernels(isa).gated;
  TORCH_CHECK(act == kSilu || act == kGeluTanh, "gated_activation: unknown activation ", act);
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && h.dim() >= 1 && h.size(-1) % 2 == 0 &&
                  (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16),
              "gated_activation: need a contiguous fp32/bf16 CPU tensor with an even last dimension");
  const int64_t inter = h.size(-1) / 2, rows = inter ? h.numel() / h.size(-1) : 0;
  std::vector<int64_t> shape = out_shape(h, inter);
  at::Tensor out = at::empty(shape, h.options());
  const bool bf16 = h.scalar_type() == at::kBFloat16;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(inter, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    fn(h.const_data_ptr(), out.data_ptr(), inter, r0, r1, static_cast<int>(act), bf16);
  });
  return out;
}

// The experts one token's router logits choose (polylm.ir.MoE.routing), as (expert, fp32 weight) pairs in the
// experts' order: the softmax over all experts, its k largest (renormalized to sum 1 when `normalize`), or the k
// largest logits, softmaxed among themselves. Ties go to the lowest id; a NaN ranks above every number (as
// torch.topk ranks it). The softmax is ATen's: exp(l - max), each times 1 / sum.
static std::vector<std::pair<int64_t, float>> route_token(const std::vector<float>& logits, int64_t k,
                                                          bool softmax_first, bool normalize) {
  const int64_t E = static_cast<int64_t>(logits.size());
  auto softmax = [](std::vector<float>& v) {
    float top = -INFINITY, sum = 0.0f;
    for (float l : v) top = std::isnan(l) || l > top ? l : top;
    for (float& l : v) sum += (l = std::exp(l - top));
    const float inv = 1.0f / sum;
    for (float& l : v) l *= inv;
  };
  std::vector<float> scores = logits;
  if (softmax_first) softmax(scores);
  std::vector<int64_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  const auto rank = [&](int64_t e) { return std::isnan(scores[e]) ? INFINITY : scores[e]; };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return rank(a) > rank(b) || (rank(a) == rank(b) && a < b);
  });
  std::vector<float> weights(k);
  for (int64_t i = 0; i < k; ++i) weights[i] = scores[order[i]];
  if (!softmax_first) {
    softmax(weights);
  } else if (normalize) {
    float sum = 0.0f;
    for (float w : weights) sum += w;
    for (float& w : weights) w /= sum;
  }
  std::vector<std::pair<int64_t, float>> picked(k);
  for (int64_t i = 0; i < k; ++i) picked[i] = {order[i], weights[i]};
  std::sort(picked.begin(), picked.end());
  return picked;
}

// A mixture-of-experts layer's routed experts for one token (decode), in one call: the router's logits (a kernel
// layer, rounded to x's dtype as F.linear's are), the routing (`route_token`), and each chosen expert's up layer
// (gate and up rows), gated activation and down layer, times its weight, summed in the experts' order — the
// roundings of the torch ops this replaces: each expert's output in x's dtype, its product with the fp32 weight
// computed in fp32 and rounded to x's dtype, the sum in x's dtype. The layers are the caller's (kept alive by
// the binding).
class RoutedExperts {
 public:
  RoutedExperts(GemvBase* router, std::vector<GemvBase*> ups, std::vector<GemvBase*> downs, int64_t top_k,
                bool softmax_first, bool normalize, int64_t act, int64_t isa)
      : router_(router), ups_(std::move(ups)), downs_(std::move(downs)), top_k_(top_k),
        softmax_first_(softmax_first), normalize_(normalize), act_(act), isa_(isa) {
    const int64_t E = router_->out_features();
    TORCH_CHECK(E > 0 && static_cast<int64_t>(ups_.size()) == E && static_cast<int64_t>(downs_.size()) == E,
                "RoutedExperts: need one up and one down layer per router output (", E, ")");
    TORCH_CHECK(top_k >= 1 && top_k <= E, "RoutedExperts: top_k ", top_k, " outside 1..", E);
    TORCH_CHECK(act == kSilu || act == kGeluTanh, "RoutedExperts: unknown activation ", act);
    fused_kernels(isa);  // checks the ISA
  }

  at::Tensor forward(const at::Tensor& x) const {
    if (x.dim() == 0 || x.numel() != router_->in_features())
      throw pybind11::value_error("RoutedExperts: input must be one token of " +
                                  std::to_string(router_->in_features()) + " values");
    if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16)
      throw pybind11::type_error("RoutedExperts: input must be float32 or bfloat16");
    const at::Tensor logits = router_->forward(x);  // x's dtype
    std::vector<float> scores(logits.numel());
    for (size_t e = 0; e < scores.size(); ++e)
      scores[e] = logits.scalar_type() == at::kBFloat16 ? static_cast<float>(logits.const_data_ptr<c10::BFloat16>()[e])
                                                        : logits.const_data_ptr<float>()[e];
    const auto picked = route_token(scores, top_k_, softmax_first_, normalize_);
    at::Tensor out;
    for (int64_t i = 0; i < top_k_; ++i) {
      const auto [e, weight] = picked[i];
      const at::Tensor y = downs_[e]->forward(gated_activation(ups_[e]->forward(x), act_, isa_));
      if (i == 0) out = at::empty_like(y);
      if (y.scalar_type() == at::kBFloat16)
        accumulate(y.const_data_ptr<c10::BFloat16>(), weight, out.data_ptr<c10::BFloat16>(), y.numel(), i == 0);
      else
        accumulate(y.const_data_ptr<float>(), weight, out.data_ptr<float>(), y.numel(), i == 0);
    }
    return out;
  }

 private:
  // out = y * weight (first expert) or out + y * weight, each product computed in fp32 and rounded to T, the sum
  // computed in fp32 and rounded to T: the roundings of torch's `y.mul_(weight)` and `out.add_(y)` (whose
  // mixed-dtype TensorIterator costs ~15 µs a call on a [1, hidden] row).
  template <class T>
  static void accumulate(const T* y, float weight, T* out, int64_t n, bool first) {
    for (int64_t j = 0; j < n; ++j) {
      const T product = static_cast<T>(static_cast<float>(y[j]) * weight);
      out[j] = first ? product : static_cast<T>(static_cast<float>(out[j]) + static_cast<float>(product));
    }
  }

  GemvBase* router_;
  std::vector<GemvBase*> ups_, downs_;
  int64_t top_k_;
  bool softmax_first_, normalize_;
  int64_t act_, isa_;
};

// (x + delta, RMSNorm of it) for contiguous fp32/bf16 x and delta of one shape (delta None: (x, norm of x));
// weight and bias fp32 [hidden].
static std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& delta,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, double eps,
                                                      int64_t isa) {
  const auto fn = fused_kernels(isa).add_rms_norm;
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "add_rms_norm: x must be a contiguous fp32/bf16 CPU tensor");
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  const bool has_delta = delta.has_value() && delta->defined();
  TORCH_CHECK(!has_delta || (delta->is_contiguous() && delta->sizes() == x.sizes() &&
                             delta->scalar_type() == x.scalar_type()),
              "add_rms_norm: delta must be contiguous with x's shape and dtype");
  auto check_vector = [hidden](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == hidden, "add_rms_norm: ",
                name, " must be a contiguous fp32 vector of ", hidden);
  };
  check_vector(weight, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_vector(*bias, "bias");
  at::Tensor res = has_delta ? at::empty_like(x) : x, out = at::empty_like(x);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    fn(x.const_data_ptr(), has_delta ? delta->const_data_ptr() : nullptr, has_delta ? res.data_ptr() : nullptr,
       weight.const_data_ptr<float>(), has_bias ? bias->const_data_ptr<float>() : nullptr, out.data_ptr(), hidden,
       r0, r1, static_cast<float>(eps), bf16);
  });
  return {res, out};
}

// Attention of q [B, H, T, d] over the first `length` slots of keys/values [B, KVH, cap, d] with an additive
// bias [B, 1|H, T, length], the scaled scores capped to softcap * tanh(score / softcap) first when softcap > 0;
// returns [B, T, H * d]. For few query rows (decode).
static at::Tensor attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& bias, int64_t length, double scale, double softcap, int64_t isa) {
  const auto fn = fused_kernels(isa).attention;
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "attention: q must be fp32 or bf16");
  for (const at::Tensor* t : {&q, &keys, &values, &bias})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 4, "attention: need contiguous 4-D CPU tensors");
  TORCH_CHECK(keys.scalar_type() == dt && values.scalar_type() == dt && keys.sizes() == values.sizes(),
              "attention: keys and values must match q's dtype and each other's shape");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), KVH = keys.size(1), cap = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == d && KVH > 0 && H % KVH == 0 && d <= 256,
              "attention: keys [B, KVH, cap, d] must match q [B, H, T, d] with H a multiple of KVH and d <= 256");
  TORCH_CHECK(length > 0 && length <= cap, "attention: length ", length, " outside 1..", cap);
  TORCH_CHECK(softcap >= 0, "attention: softcap must be >= 0 (0: none)");
  TORCH_CHECK((bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kBFloat16) && bias.size(0) == B &&
                  (bias.size(1) == 1 || bias.size(1) == H) && bias.size(2) == T && bias.size(3) == length,
              "attention: bias must be fp32/bf16 [B, 1|H, T, length]");
  at::Tensor out = at::empty({B, T, H * d}, q.options());
  // the heads sharing a key/value head go together (their keys and values read once), split into as many
  // chunks as it takes to give every thread work
  const int64_t group = H / KVH, base = B * T * KVH;
  const int64_t splits = std::clamp<int64_t>((at::get_num_threads() + base - 1) / base, 1, group);
  const int64_t chunk = (group + splits - 1) / splits, units = base * ((group + chunk - 1) / chunk);
  AttentionArgs a{q.const_data_ptr(), keys.const_data_ptr(), values.const_data_ptr(), bias.const_data_ptr(),
                  out.data_ptr(), H, KVH, T, d, cap, length, bias.size(1), chunk, static_cast<float>(scale),
                  static_cast<float>(softcap), dt == at::kBFloat16, bias.scalar_type() == at::kBFloat16};
  const size_t floats = static_cast<size_t>(attention_scratch(chunk, length, d));
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    fn(a, u0, u1, reinterpret_cast<float*>(scratch(floats * sizeof(float))));
  });
  return out;
}

// Rounds like one elementwise torch op of dtype T (computed in fp32, stored as T).
template <class T>
static inline float rounded(float v) { return static_cast<float>(static_cast<T>(v)); }

// One row of head_dim values rotated (RoPE with cos/sin [rot / 2], cast to T first, each product, sum and
// difference rounded to T, exactly as the torch ops compute it) or copied, into dst.
template <class T>
static inline void rotate_row(const T* src, T* dst, const float* cos, const float* sin, int64_t d, int64_t rot,
                              bool interleaved) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float c = rounded<T>(cos[i]), s = rounded<T>(sin[i]);
    const float x1 = static_cast<float>(src[a]), x2 = static_cast<float>(src[b]);
    dst[a] = static_cast<T>(rounded<T>(x1 * c) - rounded<T>(x2 * s));
    dst[b] = static_cast<T>(rounded<T>(x2 * c) + rounded<T>(x1 * s));
  }
  std::copy(src + rot, src + d, dst + rot);
}

template <class T>
static void rope_rows(const at::Tensor& qkv, const float* cos, const float* sin, at::Tensor& keys, at::Tensor& values,
                      at::Tensor& q, int64_t past, int64_t H, int64_t KVH, int64_t d, int64_t rot, bool interleaved) {
  const int64_t B = qkv.size(0), T_ = qkv.size(1), cap = keys.size(2), width = (H + 2 * KVH) * d;
  const T* src = qkv.const_data_ptr<T>();
  T *qo = q.data_ptr<T>(), *ko = keys.data_ptr<T>(), *vo = values.data_ptr<T>();
  at::parallel_for(0, B * T_, std::max<int64_t>(1, 4096 / width), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T_, t = r % T_;
      const T* row = src + r * width;
      const float *c = cos + r * (rot / 2), *s = sin + r * (rot / 2);
      for (int64_t h = 0; h < H; ++h) rotate_row(row + h * d, qo + ((b * H + h) * T_ + t) * d, c, s, d, rot, interleaved);
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t slot = ((b * KVH + h) * cap + past + t) * d;
        rotate_row(row + (H + h) * d, ko + slot, c, s, d, rot, interleaved);
        std::copy(row + (H + KVH + h) * d, row + (H + KVH + h + 1) * d, vo + slot);
      }
    }
  });
}

// Splits qkv [B, T, (H + 2 KVH) d] into heads, rotates q and k by RoPE over their first `rot` dims (cos/sin fp32
// [B, T, rot / 2]; rot 0: no rotation), writes k and v into the caches [B, KVH, cap, d] at slots past..past+T and
// returns q [B, H, T, d] — the torch ops' results, in one pass.
static at::Tensor rope_and_cache(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                                 const std::optional<at::Tensor>& sin, at::Tensor keys, at::Tensor values,
                                 int64_t past, int64_t H, int64_t KVH, int64_t d, int64_t rot, bool interleaved) {
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "rope_and_cache: qkv must be fp32 or bf16");
  TORCH_CHECK(qkv.device().is_cpu() && qkv.is_contiguous() && qkv.dim() == 3 && qkv.size(2) == (H + 2 * KVH) * d,
              "rope_and_cache: qkv must be a contiguous [B, T, (H + 2 KVH) d] CPU tensor");
  const int64_t B = qkv.size(0), T_ = qkv.size(1);
  for (const at::Tensor* c : {&keys, &values})
    TORCH_CHECK(c->is_contiguous() && c->scalar_type() == dt && c->dim() == 4 && c->size(0) == B &&
                    c->size(1) == KVH && c->size(3) == d && past >= 0 && past + T_ <= c->size(2),
                "rope_and_cache: caches must be contiguous [B, KVH, cap, d] of qkv's dtype with room for the step");
  TORCH_CHECK(rot >= 0 && rot % 2 == 0 && rot <= d, "rope_and_cache: rotary dims must be even and <= head_dim");
  at::Tensor c32, s32;
  if (rot > 0) {
    TORCH_CHECK(cos.has_value() && sin.has_value(), "rope_and_cache: rotation needs cos and sin");
    const auto float_rows = [&](const at::Tensor& t) {  // as it comes (the runtime's form) or made so
      return t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == at::IntArrayRef{B, T_, rot / 2}
                 ? t
                 : t.to(at::kFloat).expand({B, T_, rot / 2}).contiguous();
    };
    c32 = float_rows(*cos);
    s32 = float_rows(*sin);
  }
  at::Tensor q = at::empty({B, H, T_, d}, qkv.options());
  const float* cp = rot > 0 ? c32.const_data_ptr<float>() : nullptr;
  const float* sp = rot > 0 ? s32.const_data_ptr<float>() : nullptr;
  if (dt == at::kFloat) rope_rows<float>(qkv, cp, sp, keys, values, q, past, H, KVH, d, rot, interleaved);
  else rope_rows<c10::BFloat16>(qkv, cp, sp, keys, values, q, past, H, KVH, d, rot, interleaved);
  return q;
}

// One decoder block for a decode step, its compiled ops chained here instead of from Python (~10 calls a layer
// whose host work outweighs a small model's weight reads): x + delta and its RMSNorm, the fused q/k/v layer, RoPE and
// the cache write (`rope_and_cache`), attention over the cache (`attention`), the output layer, the residual add and
// the MLP's RMSNorm, then the MLP — a token's routed experts (`RoutedExperts`) or a gated dense MLP. The very calls,
// in the same order, that the runtime makes through `CpuOps` for such a block, so the results are bit-identical; the
// Python side (`FusedKernels.decode_block`) decides which blocks qualify. Returns (residual, MLP output): the
// runtime's next (x, delta).
class DecodeBlock {
 public:
  struct Norm {
    at::Tensor weight;
    std::optional<at::Tensor> bias;
    double eps;
  };

  DecodeBlock(at::Tensor attn_weight, std::optional<at::Tensor> attn_bias, double attn_eps, GemvBase* qkv,
              GemvBase* out, at::Tensor mlp_weight, std::optional<at::Tensor> mlp_bias, double mlp_eps,
              RoutedExperts* experts, GemvBase* up, GemvBase* down, int64_t act, int64_t heads, int64_t kv_heads,
              int64_t head_dim, int64_t rotary_dim, bool interleaved, double scale, double softcap, int64_t isa)
      : attn_norm_{std::move(attn_weight), std::move(attn_bias), attn_eps}, qkv_(qkv), out_(out),
        mlp_norm_{std::move(mlp_weight), std::move(mlp_bias), mlp_eps}, experts_(experts), up_(up), down_(down),
        act_(act), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), rotary_dim_(rotary_dim),
        interleaved_(interleaved), scale_(scale), softcap_(softcap), isa_(isa) {
    TORCH_CHECK((experts != nullptr) != (up != nullptr && down != nullptr),
                "DecodeBlock: need routed experts or a dense MLP's up and down layers");
    fused_kernels(isa);  // checks the ISA
  }

  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& delta,
                                            const at::Tensor& keys, const at::Tensor& values,
                                            const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                                            const at::Tensor& bias, int64_t past, int64_t length) const {
    auto [residual, normed] = norm(attn_norm_, x, delta);
    const at::Tensor q = rope_and_cache(qkv_->forward(normed), cos, sin, keys, values, past, heads_, kv_heads_,
                                        head_dim_, rotary_dim_, interleaved_);
    const at::Tensor attended = out_->forward(attention(q, keys, values, bias, length, scale_, softcap_, isa_));
    auto [residual2, normed2] = norm(mlp_norm_, residual, attended);
    at::Tensor mlp = experts_ != nullptr ? experts_->forward(normed2)
                                         : down_->forward(gated_activation(up_->forward(normed2), act_, isa_));
    return {residual2, mlp};
  }

 private:
  std::pair<at::Tensor, at::Tensor> norm(const Norm& n, const at::Tensor& x,
                                         const std::optional<at::Tensor>& delta) const {
    return add_rms_norm(x, delta, n.weight, n.bias, n.eps, isa_);
  }

  Norm attn_norm_;
  GemvBase *qkv_, *out_;
  Norm mlp_norm_;
  RoutedExperts* experts_;
  GemvBase *up_, *down_;
  int64_t act_, heads_, kv_heads_, head_dim_, rotary_dim_;
  bool interleaved_;
  double scale_, softcap_;
  int64_t isa_;
};

}  // namespace polylm_gemv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace g = polylm_gemv;
  m.doc() = "polylm small-M CPU matrix-vector kernels over 16-row packed weights";
  m.def("stream_read", &g::stream_read, pybind11::arg("tensor"), pybind11::arg("streams") = 4,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Read every byte of a tensor with torch's threads, each as `streams` sequential streams (a benchmark "
        "baseline); returns a checksum.");
  m.def("gated_activation", &g::gated_activation, pybind11::arg("h"), pybind11::arg("act"), pybind11::arg("isa"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "act(gate) * up over the two halves of h's last dimension (act: 0 = SiLU, 1 = tanh-GELU).");
  m.def("add_rms_norm", &g::add_rms_norm, pybind11::arg("x"), pybind11::arg("delta"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("eps"), pybind11::arg("isa"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(x + delta, RMSNorm(x + delta) * weight + bias) in fp32 math, one rounding per output.");
  m.def("attention", &g::attention, pybind11::arg("q"), pybind11::arg("keys"), pybind11::arg("values"),
        pybind11::arg("bias"), pybind11::arg("length"), pybind11::arg("scale"), pybind11::arg("softcap"),
        pybind11::arg("isa"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "softmax(cap(scale * q k^T) + bias) v over the first `length` cache slots, fp32 math; [B, T, H * d]; "
        "cap(s) = softcap * tanh(s / softcap), or s when softcap is 0.");
  m.def("rope_and_cache", &g::rope_and_cache, pybind11::arg("qkv"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("past"), pybind11::arg("heads"),
        pybind11::arg("kv_heads"), pybind11::arg("head_dim"), pybind11::arg("rotary_dim"),
        pybind11::arg("interleaved"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Split qkv into heads, RoPE-rotate q and k, write k and v into the caches; returns q [B, H, T, d].");
  m.def("cpu_has", &g::cpu_has, "Whether the CPU supports 'avx2', 'avx512' (F/BW/VL/DQ/VNNI) or 'avx512bf16'.");
  pybind11::class_<g::GemvBase>(m, "GemvBase")
      .def("__call__", &g::GemvBase::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("unpacked", &g::GemvBase::unpacked)
      .def_property_readonly("in_features", &g::GemvBase::in_features)
      .def_property_readonly("out_features", &g::GemvBase::out_features);
  pybind11::class_<g::RoutedExperts>(m, "RoutedExperts")
      .def(pybind11::init<g::GemvBase*, std::vector<g::GemvBase*>, std::vector<g::GemvBase*>, int64_t, bool, bool,
                          int64_t, int64_t>(),
           pybind11::arg("router"), pybind11::arg("ups"), pybind11::arg("downs"), pybind11::arg("top_k"),
           pybind11::arg("softmax_first"), pybind11::arg("normalize"), pybind11::arg("act"), pybind11::arg("isa"),
           pybind11::keep_alive<1, 2>(), pybind11::keep_alive<1, 3>(), pybind11::keep_alive<1, 4>())
      .def("__call__", &g::RoutedExperts::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "One token's routed experts: router, routing, the chosen experts' MLPs, their weighted sum.");
  pybind11::class_<g::DecodeBlock>(m, "DecodeBlock")
      .def(pybind11::init<at::Tensor, std::optional<at::Tensor>, double, g::GemvBase*, g::GemvBase*, at::Tensor,
                          std::optional<at::Tensor>, double, g::RoutedExperts*, g::GemvBase*, g::GemvBase*, int64_t,
                          int64_t, int64_t, int64_t, int64_t, bool, double, double, int64_t>(),
           pybind11::arg("attn_weight"), pybind11::arg("attn_bias"), pybind11::arg("attn_eps"), pybind11::arg("qkv"),
           pybind11::arg("out"), pybind11::arg("mlp_weight"), pybind11::arg("mlp_bias"), pybind11::arg("mlp_eps"),
           pybind11::arg("experts"), pybind11::arg("up"), pybind11::arg("down"), pybind11::arg("act"),
           pybind11::arg("heads"), pybind11::arg("kv_heads"), pybind11::arg("head_dim"), pybind11::arg("rotary_dim"),
           pybind11::arg("interleaved"), pybind11::arg("scale"), pybind11::arg("softcap"), pybind11::arg("isa"),
           pybind11::keep_alive<1, 5>(), pybind11::keep_alive<1, 6>(), pybind11::keep_alive<1, 10>(),
           pybind11::keep_alive<1, 11>(), pybind11::keep_alive<1, 12>())
      .def("__call__", &g::DecodeBlock::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "One block of a decode step: (residual, MLP output), the runtime's next (x, delta).");
  pybind11::class_<g::FloatGemv, g::GemvBase>(m, "FloatGemv")
      .def(pybind11::init<at::Tensor, int64_t, int64_t, std::optional<at::Tensor>, int, int64_t>());
  pybind11::class_<g::QuantGemv, g::GemvBase>(m, "QuantGemv")
      .def(pybind11::init<at::Tensor, at::Tensor, int, int64_t, int64_t, int64_t, std::optional<at::Tensor>, int,
                          int64_t>());
}
