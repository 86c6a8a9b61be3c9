// Fused elementwise kernels and the decode attention of the torch CPU path, written once against a vector
// type `V` (lanes of fp32; see the two definitions in kernels.cpp). Not a standalone header: kernels.cpp
// includes it inside each ISA's `#pragma GCC target` region and namespace, so each gets its own compilation.

// exp(x) to about 1 ulp: x = n ln2 + r (two-part ln2), a degree-7 Taylor polynomial on |r| <= ln2 / 2, times
// 2^n. NaN stays NaN; x is clamped to [-87, 88], which the callers tolerate: a sigmoid's 1 / (1 + exp) still
// saturates, and a softmax weight below e^-87 becomes 1.6e-38 instead of 0.
static inline V::F exp_v(V::F x) {
  x = V::max(V::set1(-87.0f), V::min(V::set1(88.0f), x));
  const V::F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  V::F r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  V::F p = V::set1(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = V::fmadd(p, r, V::set1(c));
  return V::scale2(p, n);
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

static inline float dot(const void* a, const void* b, int64_t len, bool bf16) {
  V::F acc = V::zero();
  for (int64_t i = 0; i < len; i += V::kLanes) {
    const int n = active(len - i);
    acc = V::fmadd(V::load(a, i, n, bf16), V::load(b, i, n, bf16), acc);
  }
  return V::sum(acc);
}

// One query row at a time: scores (softcapped if asked), a max-subtracted softmax, and the weighted sum of values
// (d <= 256).
static void attention(const AttentionArgs& a, int64_t u0, int64_t u1, float* scores) {
  constexpr int kMaxVectors = 256 / V::kLanes;
  const int64_t es = a.bf16 ? 2 : 4, group = a.heads / a.kv_heads, nv = (a.d + V::kLanes - 1) / V::kLanes;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t t = u % a.T, h = u / a.T % a.heads, b = u / (a.T * a.heads);
    const uint8_t* q = static_cast<const uint8_t*>(a.q) + u * a.d * es;
    const int64_t kv_off = (b * a.kv_heads + h / group) * a.cap * a.d * es;
    const uint8_t* keys = static_cast<const uint8_t*>(a.keys) + kv_off;
    const uint8_t* values = static_cast<const uint8_t*>(a.values) + kv_off;
    const int64_t bias_row = ((b * a.bias_heads + (a.bias_heads == 1 ? 0 : h)) * a.T + t) * a.L;
    for (int64_t j = 0; j < a.L; ++j) scores[j] = a.scale * dot(q, keys + j * a.d * es, a.d, a.bf16);
    if (a.softcap > 0.0f)
      for (int64_t j = 0; j < a.L; ++j) scores[j] = a.softcap * std::tanh(scores[j] / a.softcap);
    V::F vmax = V::set1(-INFINITY);
    for (int64_t j = 0; j < a.L; j += V::kLanes) {
      const int n = active(a.L - j);
      const V::F s = V::add(V::loadf(scores + j, n), V::load(a.bias, bias_row + j, n, a.bias_bf16));
      V::storef(scores + j, n, s);
      vmax = V::max_active(vmax, s, n);
    }
    const V::F top = V::set1(V::top(vmax));
    V::F vsum = V::zero();
    for (int64_t j = 0; j < a.L; j += V::kLanes) {
      const int n = active(a.L - j);
      const V::F e = V::keep_active(exp_v(V::sub(V::loadf(scores + j, n), top)), n);
      V::storef(scores + j, n, e);
      vsum = V::add(vsum, e);
    }
    const V::F inv = V::set1(1.0f / V::sum(vsum));
    V::F acc[kMaxVectors];
    for (int64_t v = 0; v < nv; ++v) acc[v] = V::zero();
    for (int64_t j = 0; j < a.L; ++j) {
      const V::F p = V::set1(scores[j]);
      const uint8_t* row = values + j * a.d * es;
      for (int64_t v = 0; v < nv; ++v)
        acc[v] = V::fmadd(p, V::load(row, v * V::kLanes, active(a.d - v * V::kLanes), a.bf16), acc[v]);
    }
    uint8_t* out = static_cast<uint8_t*>(a.out) + ((b * a.T + t) * a.heads + h) * a.d * es;
    for (int64_t v = 0; v < nv; ++v)
      V::store(out, v * V::kLanes, active(a.d - v * V::kLanes), V::mul(acc[v], inv), a.bf16);
  }
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
