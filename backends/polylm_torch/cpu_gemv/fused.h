// Fused elementwise kernels and the decode attention of the torch CPU path, written once against a vector
// type `V` (lanes of fp32; see the two definitions in kernels.cpp). Not a standalone header: kernels.cpp
// includes it inside each ISA's `#pragma GCC target` region and namespace, so each gets its own compilation.

// exp(x) to about 1 ulp: x = n ln2 + r (two-part ln2), a degree-7 Taylor polynomial on |r| <= ln2 / 2, times
// 2^n. NaN stays NaN; x is clamped to [-87, 88] for the polynomial and the result is 0 below -87 (the true value
// is below 1.6e-38: a masked slot's softmax weight must be 0, not a number whose products are subnormal, which
// cost the CPU ~100 cycles each).
static inline V::F exp_v(V::F x) {
  const V::F below = x;
  x = V::max(V::set1(-87.0f), V::min(V::set1(88.0f), x));
  const V::F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  V::F r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  V::F p = V::set1(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = V::fmadd(p, r, V::set1(c));
  return V::zero_below(V::scale2(p, n), below, -87.0f);
}

static inline int active(int64_t left) { return left >= V::kLanes ? V::kLanes : static_cast<int>(left); }

static void add_rms_norm(const void* x, const void* delta, void* res, const float* w, const float* b, void* out,
                         int64_t hidden, int64_t r0, int64_t r1, float eps, bool bf16) {
  const int64_t esize = bf16 ? 2 : 4;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * hidden * esize;
    const void* xr = static_cast<const uint8_t*>(x) + off;
    void* rr = delta ? static_cast<uint8_t*>(res) + off : nullptr;
    V::F squares = V::zero();
    for (int64_t i = 0; i < hidden; i += V::kLanes) {
      const int n = active(hidden - i);
      V::F v = V::load(xr, i, n, bf16);
      if (delta) {
        v = V::add(v, V::load(static_cast<const uint8_t*>(delta) + off, i, n, bf16));
        V::store(rr, i, n, v, bf16);
        if (bf16) v = V::load(rr, i, n, true);  // the rounded sum, as the next layer sees it
      }
      squares = V::fmadd(v, v, squares);
    }
    const V::F scale = V::set1(1.0f / std::sqrt(V::sum(squares) / hidden + eps));
    const void* src = delta ? rr : xr;
    void* dst = static_cast<uint8_t*>(out) + off;
    for (int64_t i = 0; i < hidden; i += V::kLanes) {
      const int n = active(hidden - i);
      V::F v = V::mul(V::mul(V::load(src, i, n, bf16), scale), V::loadf(w + i, n));
      if (b) v = V::add(v, V::loadf(b + i, n));
      V::store(dst, i, n, v, bf16);
    }
  }
}

// Attention of the query rows of one (batch, position, key/value head) for a chunk of the heads sharing that
// key/value head (a unit): the keys and values are read and converted once per kLanes slots for the whole chunk
// (into fp32 rows of dp = nv * kLanes floats), a head's kLanes scores come from kLanes dot products summed across
// lanes at once (V::sums), then the bias (softcap first), a max-subtracted softmax and the weighted sum of values.
// NV = nv, the vectors of a head (d <= 256); scratch: scores [chunk][L], then q, acc [chunk][dp], block [kLanes][dp].
template <int NV>
static void attention_units(const AttentionArgs& a, int64_t u0, int64_t u1, float* scratch) {
  constexpr int kL = V::kLanes, dp = NV * kL;
  const int64_t es = a.bf16 ? 2 : 4, group = a.heads / a.kv_heads, chunks = (group + a.chunk - 1) / a.chunk;
  float* scores = scratch;
  float* qs = scores + a.chunk * a.L;
  float* acc = qs + a.chunk * dp;
  float* block = acc + a.chunk * dp;
  const int tail = static_cast<int>(a.d - (NV - 1) * kL);  // lanes of a head's last vector
  // slots j0.. as fp32 rows of dp floats (zeros past L and past d): the cache itself where it holds them so
  // (fp32, d = dp, a whole block), else converted into `block`
  const auto load_rows = [&](const uint8_t* rows, int64_t j0) -> const float* {
    const int count = active(a.L - j0);
    if (!a.bf16 && tail == kL && count == kL) return reinterpret_cast<const float*>(rows) + j0 * dp;
    for (int r = 0; r < kL; ++r) {
      const uint8_t* row = rows + (j0 + r) * a.d * es;
      for (int v = 0; v < NV; ++v)
        V::storef(block + r * dp + v * kL, kL, V::load(row, v * kL, r < count ? (v == NV - 1 ? tail : kL) : 0, a.bf16));
    }
    return block;
  };
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u % chunks, kvh = u / chunks % a.kv_heads, t = u / (chunks * a.kv_heads) % a.T;
    const int64_t b = u / (chunks * a.kv_heads * a.T);
    const int64_t h0 = kvh * group + c * a.chunk, hn = std::min<int64_t>(a.chunk, group - c * a.chunk);
    const int64_t kv_off = (b * a.kv_heads + kvh) * a.cap * a.d * es;
    const uint8_t* keys = static_cast<const uint8_t*>(a.keys) + kv_off;
    const uint8_t* values = static_cast<const uint8_t*>(a.values) + kv_off;
    for (int64_t i = 0; i < hn; ++i) {
      const uint8_t* q = static_cast<const uint8_t*>(a.q) + ((b * a.heads + h0 + i) * a.T + t) * a.d * es;
      for (int v = 0; v < NV; ++v) {
        V::storef(qs + i * dp + v * kL, kL, V::mul(V::set1(a.scale), V::load(q, v * kL, active(a.d - v * kL), a.bf16)));
        V::storef(acc + i * dp + v * kL, kL, V::zero());
      }
    }
    for (int64_t j0 = 0; j0 < a.L; j0 += kL) {  // scores
      const float* rows = load_rows(keys, j0);
      for (int64_t i = 0; i < hn; ++i) {
        V::F dots[kL];
        for (int r = 0; r < kL; ++r) dots[r] = V::zero();
        for (int v = 0; v < NV; ++v) {
          const V::F qv = V::loadf(qs + i * dp + v * kL, kL);
          for (int r = 0; r < kL; ++r) dots[r] = V::fmadd(qv, V::loadf(rows + r * dp + v * kL, kL), dots[r]);
        }
        V::storef(scores + i * a.L + j0, active(a.L - j0), V::sums(dots));
      }
    }
    for (int64_t i = 0; i < hn; ++i) {  // softmax weights, unnormalized
      float* s = scores + i * a.L;
      const int64_t h = h0 + i, bias_row = ((b * a.bias_heads + (a.bias_heads == 1 ? 0 : h)) * a.T + t) * a.L;
      if (a.softcap > 0.0f)
        for (int64_t j = 0; j < a.L; ++j) s[j] = a.softcap * std::tanh(s[j] / a.softcap);
      V::F vmax = V::set1(-INFINITY);
      for (int64_t j = 0; j < a.L; j += kL) {
        const int n = active(a.L - j);
        const V::F x = V::add(V::loadf(s + j, n), V::load(a.bias, bias_row + j, n, a.bias_bf16));
        V::storef(s + j, n, x);
        vmax = V::max_active(vmax, x, n);
      }
      const V::F top = V::set1(V::top(vmax));
      for (int64_t j = 0; j < a.L; j += kL) {
        const int n = active(a.L - j);
        V::storef(s + j, n, V::keep_active(exp_v(V::sub(V::loadf(s + j, n), top)), n));
      }
    }
    for (int64_t j0 = 0; j0 < a.L; j0 += kL) {  // the weighted sum of values
      const float* rows = load_rows(values, j0);
      const int count = active(a.L - j0);
      for (int64_t i = 0; i < hn; ++i) {
        const float* p = scores + i * a.L + j0;
        V::F even[NV], odd[NV];  // two sums, so that 2 NV products are in flight
        for (int v = 0; v < NV; ++v) even[v] = V::loadf(acc + i * dp + v * kL, kL), odd[v] = V::zero();
        int r = 0;
        for (; r + 1 < count; r += 2) {
          const V::F p0 = V::set1(p[r]), p1 = V::set1(p[r + 1]);
          for (int v = 0; v < NV; ++v) {
            even[v] = V::fmadd(p0, V::loadf(rows + r * dp + v * kL, kL), even[v]);
            odd[v] = V::fmadd(p1, V::loadf(rows + (r + 1) * dp + v * kL, kL), odd[v]);
          }
        }
        if (r < count)
          for (int v = 0; v < NV; ++v) even[v] = V::fmadd(V::set1(p[r]), V::loadf(rows + r * dp + v * kL, kL), even[v]);
        for (int v = 0; v < NV; ++v) V::storef(acc + i * dp + v * kL, kL, V::add(even[v], odd[v]));
      }
    }
    for (int64_t i = 0; i < hn; ++i) {
      V::F total = V::zero();
      for (int64_t j = 0; j < a.L; j += kL) total = V::add(total, V::loadf(scores + i * a.L + j, active(a.L - j)));
      const V::F inv = V::set1(1.0f / V::sum(total));
      uint8_t* out = static_cast<uint8_t*>(a.out) + ((b * a.T + t) * a.heads + h0 + i) * a.d * es;
      for (int v = 0; v < NV; ++v)
        V::store(out, v * kL, active(a.d - v * kL), V::mul(V::loadf(acc + i * dp + v * kL, kL), inv), a.bf16);
    }
  }
}

template <int... NV>
static AttentionFn attention_table_entry(int nv, std::integer_sequence<int, NV...>) {
  AttentionFn fn = nullptr;
  ((fn = nv == NV + 1 ? &attention_units<NV + 1> : fn), ...);
  return fn;
}

// attention_units for nv = ceil(d / kLanes) vectors a head.
static void attention(const AttentionArgs& a, int64_t u0, int64_t u1, float* scratch) {
  const int nv = static_cast<int>((a.d + V::kLanes - 1) / V::kLanes);
  attention_table_entry(nv, std::make_integer_sequence<int, 256 / V::kLanes>{})(a, u0, u1, scratch);
}

// act(g) * u with act(g) = g * sigmoid(z): z = g for SiLU, z = 2 sqrt(2/pi) (g + 0.044715 g^3) for tanh-GELU
// (0.5 (1 + tanh(a)) = sigmoid(2a)).
static void gated(const void* h, void* out, int64_t inter, int64_t r0, int64_t r1, int act, bool bf16) {
  const int64_t esize = bf16 ? 2 : 4;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(h) + r * 2 * inter * esize;
    uint8_t* o = static_cast<uint8_t*>(out) + r * inter * esize;
    for (int64_t i = 0; i < inter; i += V::kLanes) {
      const int n = active(inter - i);
      const V::F g = V::load(row, i, n, bf16), u = V::load(row + inter * esize, i, n, bf16);
      V::F z = g;
      if (act == kGeluTanh) {
        const V::F g3 = V::mul(V::mul(g, g), g);
        z = V::mul(V::fmadd(g3, V::set1(0.044715f), g), V::set1(1.5957691216057308f));
      }
      // sigmoid(z) = 1 / (1 + exp(-z)), the denominator in [1, 6e37]
      const V::F sig = V::recip(V::add(V::set1(1.0f), exp_v(V::sub(V::zero(), z))));
      V::store(o, i, n, V::mul(V::mul(g, sig), u), bf16);
    }
  }
}

static void fill_fused(Kernels& k) {
  k.gated = &gated;
  k.add_rms_norm = &add_rms_norm;
  k.attention = &attention;
}
