// The CPU implementation of the SN ops, compiled once per CPU capability (kernels_*.cpp set
// CPU_CAPABILITY and the instruction set before including this file, the way ATen builds its
// own CPU kernels; see aten/src/ATen/native/cpu/group_norm_kernel.cpp for the patterns).
//
// Full-size passes (one row = the S values of one (n, c), contiguous):
//   forward:  moments (sums of x - p and (x - p)^2 with p the mean of the row's first values,
//             in float lanes folded into double every kBlock values: the offset cancels
//             before any rounding, so inputs with a large offset keep accurate variances;
//             rows of at most kBlock values, as small maps have, are reduced V::size() rows
//             at a time, so that no row pays for a horizontal reduction of its own),
//             then y = (x - c) * scale + shift with c the row's mean rounded to the input's
//             precision, so that the offset cancels exactly before the scaling.
//   backward: sum(dy), sum(dy * (x - c)), sum((x - c)^2) per row (the last recomputes the
//             IN variance, so the forward saves only x and the per-row means), then
//             dx = k * dy + a * (x - c) + b.
// Everything O(N*C) (IN -> LN/BN derivation, softmax, mixing, the analytic backward of the
// paper's Appendix H) is plain double arithmetic inside the op; the per-row parts of it run
// inside the parallel passes, per run of rows of one sample, in loops the compiler vectorises.
// Memory traffic: each second pass visits the rows of its thread in blocks, last block first,
// so it starts on what the first pass left in cache; when no statistic spans the batch (eval,
// no BN branch) both passes run per sample, the second from L2.
//
// Included after ATen's core headers and inside the capability's instruction-set scope;
// everything below lives in sn_plugin::CPU_CAPABILITY, so the variants do not collide.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#ifndef SN_INLINE
#if defined(__GNUC__)
#define SN_INLINE inline __attribute__((always_inline))
#else
#define SN_INLINE inline
#endif
#endif

namespace sn_plugin {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
template <typename T>
using acc_t = at::opmath_type<T>;  // float for float/half/bfloat16, double for double

// Values per block of float accumulation, folded into double after it.
constexpr int64_t kBlock = 2048;
// Values per parallel task: below this a thread costs more than it saves.
constexpr int64_t kGrainValues = 32768;
// A sample this small stays in L2 cache between the two passes over it.
constexpr int64_t kSampleCacheBytes = 512 * 1024;

inline int64_t row_grain(int64_t S) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(S, 1));
}

// ----------------------------------------------------------------- vector loads and stores
// A step is two opmath vectors: one vector of a reduced type (half, bfloat16) holds as many
// values as two float vectors.
template <typename T, bool kReduced = !std::is_same_v<T, acc_t<T>>>
struct Lanes;

template <typename T>
struct Lanes<T, false> {
  using V = Vectorized<T>;
  static constexpr int64_t kSize = V::size();
  static constexpr int64_t kStep = 2 * kSize;
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + kSize);
  }
  static void load(const T* p, int64_t n, V& a, V& b) {  // 0 < n < kStep; the rest is 0
    a = V::loadu(p, std::min(n, kSize));
    b = n > kSize ? V::loadu(p + kSize, n - kSize) : V(T(0));
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + kSize);
  }
  static void store(T* p, int64_t n, const V& a, const V& b) {
    a.store(p, std::min(n, kSize));
    if (n > kSize) {
      b.store(p + kSize, n - kSize);
    }
  }
};

template <typename T>
struct Lanes<T, true> {
  using V = Vectorized<float>;
  using R = Vectorized<T>;
  static constexpr int64_t kSize = V::size();
  static constexpr int64_t kStep = 2 * kSize;
  static_assert(R::size() == kStep, "a reduced-precision vector must hold two float vectors");
  static void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(R::loadu(p));
  }
  static void load(const T* p, int64_t n, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(R::loadu(p, n));
  }
  static void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store(T* p, int64_t n, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
};

template <typename V>
inline double reduce_sum(const V& v) {
  return static_cast<double>(
      at::vec::vec_reduce_all<typename V::value_type>([](V a, V b) { return a + b; }, v));
}

// Lane r of the result: the sum of the lanes of v[r], for r < V::size() (v is overwritten).
// Pairwise deinterleaving transposes as it adds: V::size() - 1 shuffle pairs for V::size()
// rows, where a horizontal reduction per row costs log2(V::size()) dependent steps each.
template <typename V>
SN_INLINE V lane_sums(V* v) {
  for (int64_t width = V::size(); width > 1; width /= 2) {
    for (int64_t i = 0; i < width / 2; ++i) {
      const auto halves = at::vec::deinterleave2(v[2 * i], v[2 * i + 1]);
      v[i] = halves.first + halves.second;
    }
  }
  return v[0];
}

// ----------------------------------------------------------------- per-row passes
// Every pass walks a row in steps of Lanes<T>::kStep values. In a row at least a step long,
// the last, partial step is the full step that ends at the row's end: an output pass rewrites
// the values it overlaps with the same values, a sum masks the lanes it has counted already
// (no masked loads or stores, which are slow or emulated on many CPUs). Rows shorter than a
// step use masked loads and stores. Outputs must not alias inputs (the ops write fresh tensors).
//
// Rows of at most kBlock values (short rows) are summed block-wise: the float lanes of
// V::size() rows are reduced together by lane_sums. Longer rows fold their lanes into double
// every kBlock values. Rows of one value ((N, C) inputs) need no pass at all: their moments
// are the value itself, and the O(N*C) loops that use them read the values directly.

// Which lanes of a row's partial step hold values not visited yet (S values a row; every
// block of kBlock values ends on a step, so a row's only partial step is its last).
template <typename T>
struct Tail {
  using V = typename Lanes<T>::V;
  V a, b;  // all bits set in those lanes of the step's two vectors, zero elsewhere

  explicit Tail(int64_t S) {
    using A = typename V::value_type;
    constexpr int64_t k = Lanes<T>::kStep;
    static_assert(kBlock % k == 0, "a block of float accumulation must end on a step");
    const int64_t size = S % k;  // values in the partial step
    const int64_t first = S >= k ? k - size : 0, last = S >= k ? k : size;
    __at_align__ A bits[k];
    for (int64_t i = 0; i < k; ++i) {
      std::memset(bits + i, i >= first && i < last ? 0xff : 0, sizeof(A));
    }
    a = V::loadu(bits);
    b = V::loadu(bits + V::size());
  }
};

// Sums of (x - p) and (x - p)^2 over the values [start, end) of a row, where end - start > 0
// and start is a multiple of kStep (values of the row before start may be read), in float lanes.
template <typename T>
SN_INLINE void shifted_sums(const T* x, int64_t start, int64_t end, acc_t<T> p, const Tail<T>& tail,
                            typename Lanes<T>::V& s1, typename Lanes<T>::V& s2) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V pv(p);
  V a1(0), b1(0), a2(0), b2(0);
  auto add = [&](const V& a, const V& b) {
    a1 += a;
    b1 += b;
    a2 = at::vec::fmadd(a, a, a2);
    b2 = at::vec::fmadd(b, b, b2);
  };
  int64_t i = start;
  for (; i + L::kStep <= end; i += L::kStep) {
    V a, b;
    L::load(x + i, a, b);
    add(a - pv, b - pv);
  }
  if (i < end) {
    V a, b;
    if (end >= L::kStep) {
      L::load(x + end - L::kStep, a, b);
    } else {
      L::load(x + i, end - i, a, b);
    }
    add((a - pv) & tail.a, (b - pv) & tail.b);
  }
  s1 = a1 + b1;
  s2 = a2 + b2;
}

// The first min(S, kStep) values of a row, summed lane-wise (zeros after them).
template <typename T>
SN_INLINE typename Lanes<T>::V head_sum(const T* x, int64_t S) {
  using L = Lanes<T>;
  typename L::V a, b;
  if (S >= L::kStep) {
    L::load(x, a, b);
  } else {
    L::load(x, S, a, b);
  }
  return a + b;
}

// IN mean and variance of `count` rows of 1 < S <= kBlock values from x. The sums are shifted
// by a pivot, the mean of the row's first values (head_sum), close enough to the row's mean
// that an offset cancels before any rounding.
template <typename T>
inline void moments_of_short_rows(const T* x, int64_t S, int64_t count, double inv_s,
                                  double inv_divisor, double* mean, double* var) {
  using L = Lanes<T>;
  using V = typename L::V;
  using A = acc_t<T>;
  constexpr int64_t kRows = V::size();
  const Tail<T> tail(S);
  const A inv_head = A(1) / static_cast<A>(std::min(S, L::kStep));
  // The pivots of a block's rows in one lane_sums while the block lies within a page (the
  // memory prefetchers follow any order there); longer rows reduce their own head, so that
  // each row is read front to back.
  const bool block_pivots = kRows * S * int64_t(sizeof(T)) <= 4096;
  for (int64_t r0 = 0; r0 < count; r0 += kRows) {
    const int64_t rows = std::min(kRows, count - r0);
    const T* block = x + r0 * S;
    V s1[kRows], s2[kRows];
    __at_align__ A pivot[kRows], sum1[kRows], sum2[kRows];
    if (block_pivots) {
      for (int64_t k = 0; k < kRows; ++k) {
        s1[k] = k < rows ? head_sum(block + k * S, S) : V(0);
      }
      (lane_sums(s1) * V(inv_head)).store(pivot);
    }
    for (int64_t k = 0; k < kRows; ++k) {
      if (k < rows) {
        if (!block_pivots) {
          pivot[k] = static_cast<A>(reduce_sum(head_sum(block + k * S, S))) * inv_head;
        }
        shifted_sums(block + k * S, 0, S, pivot[k], tail, s1[k], s2[k]);
      } else {
        s1[k] = s2[k] = V(0);
      }
    }
    lane_sums(s1).store(sum1);
    lane_sums(s2).store(sum2);
    for (int64_t k = 0; k < rows; ++k) {
      const double d1 = sum1[k], d2 = sum2[k];
      mean[r0 + k] = static_cast<double>(pivot[k]) + d1 * inv_s;
      var[r0 + k] = std::max(d2 - d1 * d1 * inv_s, 0.0) * inv_divisor;
    }
  }
}

// The same for a row of S > kBlock values: float lanes folded into double every kBlock values.
template <typename T>
inline void moments_of_long_row(const T* x, int64_t S, const Tail<T>& tail, double inv_s,
                                double inv_divisor, double& mean, double& var) {
  using A = acc_t<T>;
  const A p = static_cast<A>(reduce_sum(head_sum(x, S))) / static_cast<A>(Lanes<T>::kStep);
  double d1 = 0, d2 = 0;
  for (int64_t start = 0; start < S; start += kBlock) {
    typename Lanes<T>::V s1, s2;
    shifted_sums(x, start, std::min(S, start + kBlock), p, tail, s1, s2);
    d1 += reduce_sum(s1);
    d2 += reduce_sum(s2);
  }
  mean = static_cast<double>(p) + d1 * inv_s;
  var = std::max(d2 - d1 * d1 * inv_s, 0.0) * inv_divisor;
}

// y = (x - c) * scale + shift over a row of S values
template <typename T>
SN_INLINE void row_affine(const T* x, T* y, int64_t S, acc_t<T> c, acc_t<T> scale,
                          acc_t<T> shift) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V cv(c), sv(scale), tv(shift);
  auto step = [&](int64_t i) {
    V a, b;
    L::load(x + i, a, b);
    L::store(y + i, at::vec::fmadd(a - cv, sv, tv), at::vec::fmadd(b - cv, sv, tv));
  };
  int64_t i = 0;
  for (; i + L::kStep <= S; i += L::kStep) {
    step(i);
  }
  if (i < S) {
    if (S >= L::kStep) {
      step(S - L::kStep);
    } else {
      V a, b;
      L::load(x + i, S - i, a, b);
      L::store(y + i, S - i, at::vec::fmadd(a - cv, sv, tv), at::vec::fmadd(b - cv, sv, tv));
    }
  }
}

// sum(dy), sum(dy * (x - c)), sum((x - c)^2) over the values [start, end) of a row (as in
// shifted_sums), in float lanes
template <typename T>
SN_INLINE void grad_lane_sums(const T* dy, const T* x, int64_t start, int64_t end, acc_t<T> c,
                              const Tail<T>& tail, typename Lanes<T>::V& g,
                              typename Lanes<T>::V& p, typename Lanes<T>::V& q) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V cv(c);
  V g0(0), g1(0), p0(0), p1(0), q0(0), q1(0);
  auto add = [&](const V& da, const V& db, const V& xa, const V& xb) {
    g0 += da;
    g1 += db;
    p0 = at::vec::fmadd(da, xa, p0);
    p1 = at::vec::fmadd(db, xb, p1);
    q0 = at::vec::fmadd(xa, xa, q0);
    q1 = at::vec::fmadd(xb, xb, q1);
  };
  int64_t i = start;
  for (; i + L::kStep <= end; i += L::kStep) {
    V da, db, xa, xb;
    L::load(dy + i, da, db);
    L::load(x + i, xa, xb);
    add(da, db, xa - cv, xb - cv);
  }
  if (i < end) {
    V da, db, xa, xb;
    if (end >= L::kStep) {
      L::load(dy + end - L::kStep, da, db);
      L::load(x + end - L::kStep, xa, xb);
    } else {
      L::load(dy + i, end - i, da, db);
      L::load(x + i, end - i, xa, xb);
    }
    add(da & tail.a, db & tail.b, (xa - cv) & tail.a, (xb - cv) & tail.b);
  }
  g = g0 + g1;
  p = p0 + p1;
  q = q0 + q1;
}

// The sums of grad_lane_sums for `count` rows of 1 < S <= kBlock values from dy and x (row k
// centred on centre[k]), in double.
template <typename T>
inline void grad_sums_of_short_rows(const T* dy, const T* x, int64_t S, int64_t count,
                                    const acc_t<T>* centre, double* sum_dy, double* sum_dy_xc,
                                    double* sum_xc2) {
  using V = typename Lanes<T>::V;
  using A = acc_t<T>;
  constexpr int64_t kRows = V::size();
  const Tail<T> tail(S);
  for (int64_t r0 = 0; r0 < count; r0 += kRows) {
    const int64_t rows = std::min(kRows, count - r0);
    V g[kRows], p[kRows], q[kRows];
    for (int64_t k = 0; k < kRows; ++k) {
      if (k < rows) {
        const int64_t offset = (r0 + k) * S;
        grad_lane_sums(dy + offset, x + offset, 0, S, centre[r0 + k], tail, g[k], p[k], q[k]);
      } else {
        g[k] = p[k] = q[k] = V(0);
      }
    }
    __at_align__ A sg[kRows], sp[kRows], sq[kRows];
    lane_sums(g).store(sg);
    lane_sums(p).store(sp);
    lane_sums(q).store(sq);
    for (int64_t k = 0; k < rows; ++k) {
      sum_dy[r0 + k] = sg[k];
      sum_dy_xc[r0 + k] = sp[k];
      sum_xc2[r0 + k] = sq[k];
    }
  }
}

// The same for one row of S > kBlock values: float lanes folded into double every kBlock values.
template <typename T>
inline void grad_sums_of_long_row(const T* dy, const T* x, int64_t S, acc_t<T> c,
                                  const Tail<T>& tail, double& sum_dy, double& sum_dy_xc,
                                  double& sum_xc2) {
  sum_dy = sum_dy_xc = sum_xc2 = 0;
  for (int64_t start = 0; start < S; start += kBlock) {
    typename Lanes<T>::V g, p, q;
    grad_lane_sums(dy, x, start, std::min(S, start + kBlock), c, tail, g, p, q);
    sum_dy += reduce_sum(g);
    sum_dy_xc += reduce_sum(p);
    sum_xc2 += reduce_sum(q);
  }
}

// dx = k * dy + a * (x - c) + b over a row of S values
template <typename T>
SN_INLINE void row_dx(const T* dy, const T* x, T* dx, int64_t S, acc_t<T> c, acc_t<T> k,
                      acc_t<T> a, acc_t<T> b) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V cv(c), kv(k), av(a), bv(b);
  auto value = [&](const V& g, const V& v) {
    return at::vec::fmadd(g, kv, at::vec::fmadd(v - cv, av, bv));
  };
  auto step = [&](int64_t i) {
    V da, db, xa, xb;
    L::load(dy + i, da, db);
    L::load(x + i, xa, xb);
    L::store(dx + i, value(da, xa), value(db, xb));
  };
  int64_t i = 0;
  for (; i + L::kStep <= S; i += L::kStep) {
    step(i);
  }
  if (i < S) {
    if (S >= L::kStep) {
      step(S - L::kStep);
    } else {
      V da, db, xa, xb;
      L::load(dy + i, S - i, da, db);
      L::load(x + i, S - i, xa, xb);
      L::store(dx + i, S - i, value(da, xa), value(db, xb));
    }
  }
}

// ----------------------------------------------------------------- O(N*C) maths, in double
inline std::vector<double> to_doubles(const Tensor& t) {
  const Tensor c = t.contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sn_to_doubles", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) {
      out[i] = static_cast<double>(p[i]);
    }
  });
  return out;
}

inline void write_doubles(const Tensor& t, const double* values) {  // t contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sn_write", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      p[i] = static_cast<scalar_t>(values[i]);
    }
  });
}

inline Tensor doubles_like(const Tensor& like, const double* values, int64_t n) {
  Tensor out = at::empty({n}, like.options());
  write_doubles(out, values);
  return out;
}

inline Tensor stats_tensor(const Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().dtype(at::kDouble));
}

// Softmax of the logits; without the IN branch (an (N, C) input) its weight is 0 and the
// softmax runs over the others.
inline void mixing_weights(const Tensor& logits, bool has_in, double* w) {
  const std::vector<double> l = to_doubles(logits);
  const size_t first = has_in ? 0 : 1;
  double top = -std::numeric_limits<double>::infinity();
  for (size_t k = first; k < l.size(); ++k) {
    top = std::max(top, l[k]);
  }
  double total = 0;
  for (size_t k = first; k < l.size(); ++k) {
    w[k] = std::exp(l[k] - top);
    total += w[k];
  }
  for (size_t k = first; k < l.size(); ++k) {
    w[k] /= total;
  }
}

// Everything about one call that the per-row maths need.
struct Layer {
  int64_t N = 0, C = 0, S = 0;
  bool has_bn = false, batch_stats = false;
  double eps = 0;
  double inv_s = 0;        // 1 / S
  double in_divisor = 1;   // S, or S - 1 in the authors' convention
  double inv_divisor = 0;  // 1 / in_divisor
  double ln_factor = 1;    // C / (C - 1) for (N, C) inputs in the authors' convention
  double count = 0;        // M, the samples of the BN branch
  double bn_factor = 1;    // M / (M - 1) for (N, C) inputs in the authors' convention
  double wm[3] = {0, 0, 0};  // mixing weights of the means [IN, LN, BN] (BN 0 without it)
  double wv[3] = {0, 0, 0};  // of the variances
  std::vector<double> gamma, beta;  // C values each (1 and 0 without affine parameters)

  bool bn_from_batch() const { return has_bn && batch_stats; }
};

inline Layer make_layer(const Tensor& x, const Tensor& mean_logits, const Tensor& var_logits,
                        const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& batch_count, bool batch_stats, double eps, bool unbiased,
                        bool has_in) {
  Layer L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.S = spatial_size(x);
  L.has_bn = mean_logits.numel() == 3;
  L.batch_stats = batch_stats;
  L.eps = eps;
  L.inv_s = L.S > 0 ? 1.0 / L.S : 0.0;
  L.in_divisor = static_cast<double>(unbiased && L.S > 1 ? L.S - 1 : L.S);
  L.inv_divisor = L.in_divisor > 0 ? 1.0 / L.in_divisor : 0.0;
  const bool sample_variances = unbiased && !has_in;
  L.ln_factor = sample_variances && L.C > 1 ? double(L.C) / double(L.C - 1) : 1.0;
  L.count = batch_count.has_value() ? *batch_count->const_data_ptr<double>() : double(L.N);
  L.bn_factor = sample_variances && L.count > 1 ? L.count / (L.count - 1) : 1.0;
  mixing_weights(mean_logits, has_in, L.wm);
  mixing_weights(var_logits, has_in, L.wv);
  L.gamma = weight.has_value() ? to_doubles(*weight) : std::vector<double>(L.C, 1.0);
  L.beta = bias.has_value() ? to_doubles(*bias) : std::vector<double>(L.C, 0.0);
  return L;
}

// Visit rows [begin, end) as runs (n, c0, c1) within one sample, in order. With block_rows > 0
// the rows go in blocks of that many, the last block first (what the previous pass over these
// rows left in cache), each block in order (so that the hardware prefetcher follows it).
template <typename F>
inline void for_each_run(const Layer& L, int64_t begin, int64_t end, int64_t block_rows, const F& f) {
  auto runs = [&](int64_t from, int64_t to) {
    for (int64_t r = from; r < to;) {
      const int64_t n = r / L.C, c0 = r - n * L.C, c1 = std::min(L.C, c0 + (to - r));
      f(n, c0, c1);
      r += c1 - c0;
    }
  };
  if (block_rows <= 0) {
    runs(begin, end);
    return;
  }
  for (int64_t to = end; to > begin; to -= block_rows) {
    runs(std::max(begin, to - block_rows), to);
  }
}

// Rows per block of a second pass (see for_each_run): 64 KiB of input.
template <typename T>
inline int64_t reuse_block_rows(const Layer& L) {
  return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(L.S * int64_t(sizeof(T)), 1));
}

// The mixed mean and variance of rows (n, c0..c1). ln = [mean_ln (N); var_ln (N)],
// bn = [mean_bn (C); var_bn (C)].
inline void mix_run(const Layer& L, int64_t n, int64_t c0, int64_t c1, const double* m_in,
                    const double* v_in, const double* ln, const double* bn, double* mean,
                    double* var) {
  // Locals, and pointers at c0: the loop then vectorizes with plain loads (the compiler must
  // otherwise assume the stores may change L's doubles).
  const double lm = L.wm[1] * ln[n], lv = L.wv[1] * ln[L.N + n];
  const double wm0 = L.wm[0], wm2 = L.wm[2], wv0 = L.wv[0], wv2 = L.wv[2];
  const double* mi = m_in + n * L.C + c0;
  const double* vi = v_in + n * L.C + c0;
  const double* bn_mean = bn + c0;
  const double* bn_var = bn + L.C + c0;
#pragma omp simd
  for (int64_t k = 0; k < c1 - c0; ++k) {
    mean[k] = wm0 * mi[k] + lm + wm2 * bn_mean[k];
    var[k] = wv0 * vi[k] + lv + wv2 * bn_var[k];
  }
}

// LN statistics of sample n (Eq. 4): the mean over c of the IN means, and of
// var_in + (mean_in - mean_ln)^2.
inline void ln_statistics_of(const Layer& L, int64_t n, const double* m_in, const double* v_in,
                             double* ln) {
  using V = Vectorized<double>;
  const double* m = m_in + n * L.C;
  const double* v = v_in + n * L.C;
  const double inv_c = L.C > 0 ? 1.0 / L.C : 0.0;
  const double mean = at::vec::reduce_all<double>([](V a, V b) { return a + b; }, m, L.C) * inv_c;
  const double spread = at::vec::map2_reduce_all<double>(
      [mean](V mv, V vv) {
        const V d = mv - V(mean);
        return vv + d * d;
      },
      [](V a, V b) { return a + b; }, m, v, L.C);
  ln[n] = mean;
  ln[L.N + n] = spread * inv_c * L.ln_factor;
}

// BN statistics of this call's batch per channel (Eq. 4), over its N samples.
inline void bn_batch_statistics(const Layer& L, const double* m_in, const double* v_in, double* bn) {
  const double inv = L.N > 0 ? 1.0 / L.N : 0.0;
  double* mean = bn;
  double* var = bn + L.C;
  std::fill(bn, bn + 2 * L.C, 0.0);
  for (int64_t n = 0; n < L.N; ++n) {
    const double* m = m_in + n * L.C;
    for (int64_t c = 0; c < L.C; ++c) {
      mean[c] += m[c];
    }
  }
  for (int64_t c = 0; c < L.C; ++c) {
    mean[c] *= inv;
  }
  for (int64_t n = 0; n < L.N; ++n) {
    const double* m = m_in + n * L.C;
    const double* v = v_in + n * L.C;
    for (int64_t c = 0; c < L.C; ++c) {
      const double d = m[c] - mean[c];
      var[c] += v[c] + d * d;
    }
  }
  for (int64_t c = 0; c < L.C; ++c) {
    var[c] *= inv * L.bn_factor;
  }
}

// ----------------------------------------------------------------- forward
template <typename T>
inline void row_moments(const T* x, int64_t S, int64_t count, double inv_s, double inv_divisor,
                        double* mean, double* var) {
  if (S <= 1) {  // one value per row (or none): no variance
    for (int64_t r = 0; r < count; ++r) {
      mean[r] = S == 1 ? static_cast<double>(x[r]) : 0.0;
      var[r] = 0;
    }
  } else if (S <= kBlock) {
    moments_of_short_rows(x, S, count, inv_s, inv_divisor, mean, var);
  } else {
    const Tail<T> tail(S);
    for (int64_t r = 0; r < count; ++r) {
      moments_of_long_row(x + r * S, S, tail, inv_s, inv_divisor, mean[r], var[r]);
    }
  }
}

template <typename T>
inline void moments_of_rows(const Layer& L, const T* x, int64_t begin, int64_t end, double* m_in,
                            double* v_in) {
  row_moments(x + begin * L.S, L.S, end - begin, L.inv_s, L.inv_divisor, m_in + begin, v_in + begin);
}

// y for rows [begin, end) (block_rows: see for_each_run). scratch: 2 * C doubles and
// 3 * C acc_t<T> values.
template <typename T>
inline void affine_rows(const Layer& L, const T* x, T* y, const double* m_in, const double* v_in,
                        const double* ln, const double* bn, int64_t begin, int64_t end,
                        int64_t block_rows, double* scratch, acc_t<T>* coefficients) {
  using A = acc_t<T>;
  double* mean = scratch;
  double* var = scratch + L.C;
  A* centre = coefficients;
  A* scale = coefficients + L.C;
  A* shift = coefficients + 2 * L.C;
  const int64_t S = L.S;
  const double eps = L.eps;
  for_each_run(L, begin, end, block_rows, [&](int64_t n, int64_t c0, int64_t c1) {
    mix_run(L, n, c0, c1, m_in, v_in, ln, bn, mean, var);
    const int64_t base = n * L.C + c0, count = c1 - c0;
    const double* mi = m_in + base;
    const double* gamma = L.gamma.data() + c0;
    const double* beta = L.beta.data() + c0;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      // centre: the row's mean in the input's precision, so (x - centre) is exact
      const A c = static_cast<A>(mi[k]);
      const double scale_k = gamma[k] / std::sqrt(var[k] + eps);
      centre[k] = c;
      scale[k] = static_cast<A>(scale_k);
      shift[k] = static_cast<A>(beta[k] + (static_cast<double>(c) - mean[k]) * scale_k);
    }
    const T* x_run = x + base * S;
    T* y_run = y + base * S;
    if (S == 1) {  // one value per row (synchronized SN; the fused ops take the values path)
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) {
        y_run[k] = static_cast<T>((static_cast<A>(x_run[k]) - centre[k]) * scale[k] + shift[k]);
      }
      return;
    }
    for (int64_t k = 0; k < count; ++k) {
      row_affine(x_run + k * S, y_run + k * S, S, centre[k], scale[k], shift[k]);
    }
  });
}

// Fills bn with the BN statistics that do not come from this batch (running ones, or none).
inline void bn_statistics_not_from_batch(const Layer& L, const OptTensor& running_mean,
                                         const OptTensor& running_var, double* bn) {
  std::fill(bn, bn + 2 * L.C, 0.0);
  if (L.has_bn) {
    const std::vector<double> mean = to_doubles(*running_mean), var = to_doubles(*running_var);
    std::copy(mean.begin(), mean.end(), bn);
    std::copy(var.begin(), var.end(), bn + L.C);
  }
}

template <typename T>
void forward_passes(const Layer& L, const T* x, T* y, double* m_in, double* v_in, double* ln,
                    double* bn, const OptTensor& running_mean, const OptTensor& running_var) {
  const int64_t rows = L.N * L.C;
  const int64_t sample_values = L.C * L.S;
  if (!L.bn_from_batch() && sample_values * int64_t(sizeof(T)) <= kSampleCacheBytes) {
    // Every statistic is the sample's own: both passes per sample, the second from cache.
    bn_statistics_not_from_batch(L, running_mean, running_var, bn);
    at::parallel_for(0, L.N, std::max<int64_t>(1, kGrainValues / std::max<int64_t>(sample_values, 1)),
                     [&](int64_t begin, int64_t end) {
                       std::vector<double> scratch(2 * L.C);
                       std::vector<acc_t<T>> coefficients(3 * L.C);
                       for (int64_t n = begin; n < end; ++n) {
                         moments_of_rows(L, x, n * L.C, (n + 1) * L.C, m_in, v_in);
                         ln_statistics_of(L, n, m_in, v_in, ln);
                         affine_rows(L, x, y, m_in, v_in, ln, bn, n * L.C, (n + 1) * L.C,
                                     /*block_rows=*/0, scratch.data(), coefficients.data());
                       }
                     });
    return;
  }
  at::parallel_for(0, rows, row_grain(L.S), [&](int64_t begin, int64_t end) {
    moments_of_rows(L, x, begin, end, m_in, v_in);
  });
  for (int64_t n = 0; n < L.N; ++n) {
    ln_statistics_of(L, n, m_in, v_in, ln);
  }
  if (L.bn_from_batch()) {
    bn_batch_statistics(L, m_in, v_in, bn);
  } else {
    bn_statistics_not_from_batch(L, running_mean, running_var, bn);
  }
  // The same split of rows over the threads as the moments pass, its last rows first.
  at::parallel_for(0, rows, row_grain(L.S), [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(2 * L.C);
    std::vector<acc_t<T>> coefficients(3 * L.C);
    affine_rows(L, x, y, m_in, v_in, ln, bn, begin, end, reuse_block_rows<T>(L), scratch.data(),
                coefficients.data());
  });
}

// ----------------------------------------------------------------- one value per (n, c)
// Inputs of one value per (n, c) ((N, C) inputs, and (N, C, 1, ...) ones): the IN statistics
// are the values themselves (mean x, variance 0), so the layer mixes the LN statistics of each
// sample's C values and the BN statistics of each channel's N values, into a mean and variance
// per value. The fused ops keep nothing per (n, c): the forward returns no IN means (x holds
// them: an (N, 0) tensor in their place) and the backward recomputes each value's statistics.
// The square roots run in the input's math type (float for float, half, bfloat16).

// LN statistics of samples [begin, end): the moments of their C values.
template <typename T>
inline void ln_statistics_of_values(const Layer& L, const T* x, int64_t begin, int64_t end,
                                    double* ln) {
  const double inv_c = L.C > 0 ? 1.0 / L.C : 0.0;
  row_moments(x + begin * L.C, L.C, end - begin, inv_c, inv_c, ln + begin, ln + L.N + begin);
  for (int64_t n = begin; n < end; ++n) {
    ln[L.N + n] *= L.ln_factor;
  }
}

// BN statistics of this batch's channels: sums over n of x - x[0, c] and its square in double,
// across the channels.
template <typename T>
inline void bn_statistics_of_values(const Layer& L, const T* x, double* bn) {
  const int64_t N = L.N, C = L.C;
  if (N == 0) {
    std::fill(bn, bn + 2 * C, 0.0);
    return;
  }
  const double inv_n = 1.0 / N, factor = L.bn_factor;
  at::parallel_for(0, C, std::max<int64_t>(16, kGrainValues / N), [&](int64_t c0, int64_t c1) {
    const int64_t count = c1 - c0;
    std::vector<double> sums(2 * count, 0.0);
    double* s1 = sums.data();
    double* s2 = s1 + count;
    const T* first = x + c0;
    for (int64_t n = 0; n < N; ++n) {
      const T* row = x + n * C + c0;
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) {
        const double d = static_cast<double>(row[k]) - static_cast<double>(first[k]);
        s1[k] += d;
        s2[k] += d * d;
      }
    }
    double* mean = bn + c0;
    double* var = bn + C + c0;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      const double m = s1[k] * inv_n;
      mean[k] = static_cast<double>(first[k]) + m;
      var[k] = std::max(s2[k] * inv_n - m * m, 0.0) * factor;
    }
  });
}

// What every pass over the values of sample n needs: its LN statistics and the layer's constants.
struct ValueStats {
  double wm0, wm1, wm2, wv1, wv2, eps;
  double ln_mean, ln_var;
  const double* bn_mean;
  const double* bn_var;
  const double* gamma;

  ValueStats(const Layer& L, const double* ln, const double* bn, int64_t n)
      : wm0(L.wm[0]), wm1(L.wm[1]), wm2(L.wm[2]), wv1(L.wv[1]), wv2(L.wv[2]), eps(L.eps),
        ln_mean(ln[n]), ln_var(ln[L.N + n]), bn_mean(bn), bn_var(bn + L.C), gamma(L.gamma.data()) {}

  // The mixed mean of value v of channel c (the IN variance is 0, hence no wv0 term).
  double mean(double v, int64_t c) const { return wm0 * v + wm1 * ln_mean + wm2 * bn_mean[c]; }
  double var(int64_t c) const { return wv1 * ln_var + wv2 * bn_var[c]; }
};

template <typename T>
void forward_of_values(const Layer& L, const T* x, T* y, double* ln, double* bn,
                       const OptTensor& running_mean, const OptTensor& running_var) {
  using A = acc_t<T>;
  const int64_t C = L.C;
  at::parallel_for(0, L.N, std::max<int64_t>(1, kGrainValues / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) { ln_statistics_of_values(L, x, begin, end, ln); });
  if (L.bn_from_batch()) {
    bn_statistics_of_values(L, x, bn);
  } else {
    bn_statistics_not_from_batch(L, running_mean, running_var, bn);
  }
  const double* beta = L.beta.data();
  at::parallel_for(0, L.N, std::max<int64_t>(1, kGrainValues / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const ValueStats st(L, ln, bn, n);
      const T* xn = x + n * C;
      T* yn = y + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(xn[c]);
        const A rstd = A(1) / std::sqrt(static_cast<A>(st.var(c) + st.eps));
        const A d = static_cast<A>(v - st.mean(v, c));
        yn[c] = static_cast<T>(d * (static_cast<A>(st.gamma[c]) * rstd) + static_cast<A>(beta[c]));
      }
    }
  });
}

Layer moments_layer(const Tensor& x, bool unbiased) {
  Layer L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.S = spatial_size(x);
  L.inv_s = L.S > 0 ? 1.0 / L.S : 0.0;
  L.in_divisor = static_cast<double>(unbiased && L.S > 1 ? L.S - 1 : L.S);
  L.inv_divisor = L.in_divisor > 0 ? 1.0 / L.in_divisor : 0.0;
  return L;
}

std::tuple<Tensor, Tensor> moments(const Tensor& x, bool unbiased) {
  const Layer L = moments_layer(x, unbiased);
  Tensor mean_in = stats_tensor(x, {L.N, L.C}), var_in = stats_tensor(x, {L.N, L.C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sn_moments", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    double* m = mean_in.data_ptr<double>();
    double* v = var_in.data_ptr<double>();
    at::parallel_for(0, L.N * L.C, row_grain(L.S), [&](int64_t begin, int64_t end) {
      moments_of_rows(L, xp, begin, end, m, v);
    });
  });
  return {mean_in, var_in};
}

std::tuple<Tensor, Tensor, Tensor> normalize(
    const Tensor& x, const Tensor& mean_in, const Tensor& var_in, const OptTensor& batch_mean,
    const OptTensor& batch_var, const OptTensor& batch_count, const Tensor& mean_logits,
    const Tensor& var_logits, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool batch_stats, double eps,
    bool unbiased, bool has_in) {
  const Layer L = make_layer(x, mean_logits, var_logits, weight, bias, batch_count, batch_stats,
                             eps, unbiased, has_in);
  const double* m_in = mean_in.const_data_ptr<double>();
  const double* v_in = var_in.const_data_ptr<double>();
  Tensor ln_stats = stats_tensor(x, {2, L.N}), bn_stats = stats_tensor(x, {2, L.C});
  double* ln = ln_stats.data_ptr<double>();
  double* bn = bn_stats.data_ptr<double>();
  for (int64_t n = 0; n < L.N; ++n) {
    ln_statistics_of(L, n, m_in, v_in, ln);
  }
  if (L.bn_from_batch() && batch_mean.has_value()) {  // synchronized: over every process
    const std::vector<double> mean = to_doubles(*batch_mean), var = to_doubles(*batch_var);
    for (int64_t c = 0; c < L.C; ++c) {
      bn[c] = mean[c];
      bn[L.C + c] = var[c] * L.bn_factor;
    }
  } else if (L.bn_from_batch()) {
    bn_batch_statistics(L, m_in, v_in, bn);
  } else {
    bn_statistics_not_from_batch(L, running_mean, running_var, bn);
  }
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sn_normalize", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, L.N * L.C, row_grain(L.S), [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(2 * L.C);
      std::vector<acc_t<scalar_t>> coefficients(3 * L.C);
      affine_rows(L, xp, yp, m_in, v_in, ln, bn, begin, end, reuse_block_rows<scalar_t>(L),
                  scratch.data(), coefficients.data());
    });
  });
  return {y, ln_stats, bn_stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& x, const Tensor& mean_logits, const Tensor& var_logits, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool batch_stats, double eps, bool unbiased, bool has_in) {
  const Layer L = make_layer(x, mean_logits, var_logits, weight, bias, std::nullopt, batch_stats,
                             eps, unbiased, has_in);
  const bool values = L.S == 1;  // the IN means are x itself: none to keep (see forward_of_values)
  Tensor mean_in = stats_tensor(x, {L.N, values ? 0 : L.C});
  Tensor ln_stats = stats_tensor(x, {2, L.N}), bn_stats = stats_tensor(x, {2, L.C});
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sn_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    double* ln = ln_stats.data_ptr<double>();
    double* bn = bn_stats.data_ptr<double>();
    if (values) {
      forward_of_values<scalar_t>(L, xp, yp, ln, bn, running_mean, running_var);
    } else {
      const std::unique_ptr<double[]> var_in(new double[L.N * L.C]);  // every entry is written
      forward_passes<scalar_t>(L, xp, yp, mean_in.data_ptr<double>(), var_in.get(), ln, bn,
                               running_mean, running_var);
    }
  });
  return {y, mean_in, ln_stats, bn_stats};
}

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const Tensor& bn_stats, const OptTensor& batch_count,
                          int64_t num_samples, int64_t spatial_size, double momentum,
                          bool unbiased) {
  const double samples =
      batch_count.has_value() ? *batch_count->const_data_ptr<double>() : double(num_samples);
  const double values = samples * double(spatial_size);
  if (!(values > 1)) {  // one value per channel: no variance to learn from
    return;
  }
  // BatchNorm's unbiased batch variance; in the authors' convention the BN variance as used.
  const double correction = unbiased ? 1.0 : values / (values - 1);
  const int64_t C = running_mean.numel();
  const double* bn = bn_stats.const_data_ptr<double>();
  std::vector<double> mean = to_doubles(running_mean), var = to_doubles(running_var);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] += momentum * (bn[c] - mean[c]);
    var[c] += momentum * (bn[C + c] * correction - var[c]);
  }
  write_doubles(running_mean, mean.data());
  write_doubles(running_var, var.data());
}

// ----------------------------------------------------------------- backward
// Per row (n, c): dL/dmean and dL/dvar of the mixed statistics and the recomputed IN variance
// (what the dx pass needs), rows = N * C each.
template <typename P>
struct RowGradsOf {
  P* d_mean;
  P* d_var;
  P* v_in;
};
using RowGrads = RowGradsOf<double>;
using ConstRowGrads = RowGradsOf<const double>;

// The sums of the first backward pass: over c per sample (LN), over n per channel (BN, gamma,
// beta), and for the logits sum(dL/dmean * (mean_k - mean)), sum(dL/dvar * (var_k - var)):
// relative to the mixed statistics, so no term the size of the statistics is ever formed.
struct GradSums {
  int64_t N = 0, C = 0;
  std::vector<double> data;
  GradSums(int64_t n, int64_t c) : N(n), C(c), data(2 * n + 4 * c + 6, 0.0) {}
  double* ln() { return data.data(); }         // 2N: [sum_c dL/dmean; sum_c dL/dvar]
  double* bn() { return ln() + 2 * N; }        // 2C: [sum_n dL/dmean; sum_n dL/dvar]
  double* gamma() { return bn() + 2 * C; }     // C
  double* beta() { return gamma() + C; }       // C
  double* logits() { return beta() + C; }      // 6: means [IN, LN, BN], variances [IN, LN, BN]
  void add(const GradSums& other) {
    for (size_t i = 0; i < data.size(); ++i) {
      data[i] += other.data[i];
    }
  }
};

// The per-row sums of rows [begin, end) (in runs of one sample, see for_each_run) and what
// they add to `sums`. scratch: 5 * C doubles and C acc_t<T> values.
template <typename T>
inline void grad_sums_of_rows(const Layer& L, const T* dy, const T* x, const double* m_in,
                              const double* ln, const double* bn, int64_t begin, int64_t end,
                              const RowGrads& rows, GradSums& sums, double* scratch,
                              acc_t<T>* centre) {
  double* sum_dy = scratch;
  double* sum_dy_xc = scratch + L.C;
  double* sum_xc2 = scratch + 2 * L.C;
  double* mean = scratch + 3 * L.C;
  double* var = scratch + 4 * L.C;
  double* bn_sums = sums.bn();
  double* gamma_sums = sums.gamma();
  double* beta_sums = sums.beta();
  const int64_t S = L.S;
  for_each_run(L, begin, end, /*block_rows=*/0, [&](int64_t n, int64_t c0, int64_t c1) {
    const int64_t base = n * L.C, count = c1 - c0;
    const double* mi = m_in + base + c0;
    for (int64_t k = 0; k < count; ++k) {
      centre[k] = static_cast<acc_t<T>>(mi[k]);  // the row's mean in the input's precision
    }
    const T* dy_run = dy + (base + c0) * S;
    const T* x_run = x + (base + c0) * S;
    if (S == 1) {  // one value per row (synchronized SN; the fused ops take the values path)
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) {
        const acc_t<T> g = static_cast<acc_t<T>>(dy_run[k]);
        const acc_t<T> d = static_cast<acc_t<T>>(x_run[k]) - centre[k];
        sum_dy[k] = g;
        sum_dy_xc[k] = static_cast<double>(g) * d;
        sum_xc2[k] = static_cast<double>(d) * d;
      }
    } else if (S <= kBlock) {
      grad_sums_of_short_rows(dy_run, x_run, S, count, centre, sum_dy, sum_dy_xc, sum_xc2);
    } else {
      const Tail<T> tail(S);
      for (int64_t k = 0; k < count; ++k) {
        grad_sums_of_long_row(dy_run + k * S, x_run + k * S, S, centre[k], tail, sum_dy[k],
                              sum_dy_xc[k], sum_xc2[k]);
      }
    }
    double* v_in = rows.v_in + base + c0;
    const double inv_divisor = L.inv_divisor;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      // from the rounded centre to the exact mean: sum(x - c) = S * (mean_in - c)
      const double offset = static_cast<double>(centre[k]) - mi[k];
      sum_dy_xc[k] += offset * sum_dy[k];
      v_in[k] = std::max(sum_xc2[k] - S * offset * offset, 0.0) * inv_divisor;
    }
    mix_run(L, n, c0, c1, m_in, rows.v_in, ln, bn, mean, var);
    const double ln_mean = ln[n], ln_var = ln[L.N + n], eps = L.eps;
    const double* gamma = L.gamma.data() + c0;
    const double* bn_mean = bn + c0;
    const double* bn_var = bn + L.C + c0;
    double* d_mean = rows.d_mean + base + c0;
    double* d_var = rows.d_var + base + c0;
    double* bn_dm = bn_sums + c0;
    double* bn_dv = bn_sums + L.C + c0;
    double* gamma_grad = gamma_sums + c0;
    double* beta_grad = beta_sums + c0;
    double ln_dm = 0, ln_dv = 0, gm0 = 0, gm1 = 0, gm2 = 0, gv0 = 0, gv1 = 0, gv2 = 0;
#pragma omp simd reduction(+ : ln_dm, ln_dv, gm0, gm1, gm2, gv0, gv1, gv2)
    for (int64_t k = 0; k < count; ++k) {
      const double rstd = 1.0 / std::sqrt(var[k] + eps);
      const double dy_xmean = sum_dy_xc[k] + (mi[k] - mean[k]) * sum_dy[k];  // sum dy (x - mean)
      const double dm = -rstd * gamma[k] * sum_dy[k];
      const double dv = -0.5 * rstd * rstd * rstd * gamma[k] * dy_xmean;
      d_mean[k] = dm;
      d_var[k] = dv;
      bn_dm[k] += dm;
      bn_dv[k] += dv;
      gamma_grad[k] += rstd * dy_xmean;
      beta_grad[k] += sum_dy[k];
      ln_dm += dm;
      ln_dv += dv;
      gm0 += dm * (mi[k] - mean[k]);
      gm1 += dm * (ln_mean - mean[k]);
      gm2 += dm * (bn_mean[k] - mean[k]);
      gv0 += dv * (v_in[k] - var[k]);
      gv1 += dv * (ln_var - var[k]);
      gv2 += dv * (bn_var[k] - var[k]);
    }
    sums.ln()[n] += ln_dm;
    sums.ln()[L.N + n] += ln_dv;
    const double g[6] = {gm0, gm1, gm2, gv0, gv1, gv2};
    for (int k = 0; k < 6; ++k) {
      sums.logits()[k] += g[k];
    }
  });
}

// The GradSums of each thread of a parallel_for, combined at the end (with the softmax backward
// of the logits' sums).
class ThreadSums {
 public:
  explicit ThreadSums(const Layer& L)
      // Inside a parallel region parallel_for runs inline, on the calling thread (number 0).
      : nested_(at::in_parallel_region()),
        partial_(nested_ ? 1 : at::get_num_threads(), GradSums(L.N, L.C)) {}

  // The calling thread's sums (inside a parallel_for over the pass).
  GradSums& mine() {
    const size_t t = nested_ ? 0 : static_cast<size_t>(at::get_thread_num());
    TORCH_INTERNAL_ASSERT(t < partial_.size(), "sn_plugin: thread ", t, " of a pass sized for ",
                          partial_.size());
    return partial_[t];
  }

  GradSums total(const Layer& L) {
    GradSums total = std::move(partial_[0]);
    for (size_t t = 1; t < partial_.size(); ++t) {
      total.add(partial_[t]);
    }
    for (int k = 0; k < 3; ++k) {  // the softmax backward: w_k * g_k (sum_j w_j g_j is 0)
      total.logits()[k] *= L.wm[k];
      total.logits()[3 + k] *= L.wv[k];
    }
    return total;
  }

 private:
  bool nested_;
  std::vector<GradSums> partial_;
};

// First backward pass over every row.
template <typename T>
GradSums grad_sums_pass(const Layer& L, const T* dy, const T* x, const double* m_in,
                        const double* ln, const double* bn, const RowGrads& rows) {
  ThreadSums sums(L);
  at::parallel_for(0, L.N * L.C, row_grain(L.S), [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(5 * L.C);
    std::vector<acc_t<T>> centre(L.C);
    grad_sums_of_rows(L, dy, x, m_in, ln, bn, begin, end, rows, sums.mine(), scratch.data(),
                      centre.data());
  });
  return sums.total(L);
}

// The same for inputs of one value per (n, c), from each value's recomputed statistics.
template <typename T>
GradSums grad_sums_of_values(const Layer& L, const T* dy, const T* x, const double* ln,
                             const double* bn) {
  using A = acc_t<T>;
  const int64_t C = L.C;
  ThreadSums sums(L);
  at::parallel_for(0, L.N, std::max<int64_t>(1, kGrainValues / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    GradSums& mine = sums.mine();
    double* bn_dm = mine.bn();
    double* bn_dv = bn_dm + C;
    double* gamma_grad = mine.gamma();
    double* beta_grad = mine.beta();
    double* logits = mine.logits();
    for (int64_t n = begin; n < end; ++n) {
      const ValueStats st(L, ln, bn, n);
      const T* xn = x + n * C;
      const T* dyn = dy + n * C;
      double ln_dm = 0, ln_dv = 0, gm0 = 0, gm1 = 0, gm2 = 0, gv0 = 0, gv1 = 0, gv2 = 0;
#pragma omp simd reduction(+ : ln_dm, ln_dv, gm0, gm1, gm2, gv0, gv1, gv2)
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(xn[c]), g = static_cast<double>(dyn[c]);
        const double mean = st.mean(v, c), var = st.var(c);
        const double rstd = static_cast<double>(A(1) / std::sqrt(static_cast<A>(var + st.eps)));
        const double dy_xmean = (v - mean) * g;  // sum dy (x - mean) over the value's "row"
        const double dm = -rstd * st.gamma[c] * g;
        const double dv = -0.5 * rstd * rstd * rstd * st.gamma[c] * dy_xmean;
        bn_dm[c] += dm;
        bn_dv[c] += dv;
        gamma_grad[c] += rstd * dy_xmean;
        beta_grad[c] += g;
        ln_dm += dm;
        ln_dv += dv;
        gm0 += dm * (v - mean);
        gm1 += dm * (st.ln_mean - mean);
        gm2 += dm * (st.bn_mean[c] - mean);
        gv0 += dv * (0.0 - var);  // the IN variance is 0
        gv1 += dv * (st.ln_var - var);
        gv2 += dv * (st.bn_var[c] - var);
      }
      mine.ln()[n] += ln_dm;
      mine.ln()[L.N + n] += ln_dv;
      const double g[6] = {gm0, gm1, gm2, gv0, gv1, gv2};
      for (int k = 0; k < 6; ++k) {
        logits[k] += g[k];
      }
    }
  });
  return sums.total(L);
}

// dx for inputs of one value per (n, c): dx_pass's formula, where x - mean_in is 0.
template <typename T>
void dx_of_values(const Layer& L, const T* dy, const T* x, T* dx, const double* ln,
                  const double* bn, const double* ln_grad, const double* bn_grad) {
  using A = acc_t<T>;
  const int64_t C = L.C;
  const double inv_c = C > 0 ? 1.0 / C : 0.0;
  const double inv_m = L.bn_from_batch() ? 1.0 / std::max(L.count, 1.0) : 0.0;
  const double ln_factor = L.ln_factor, bn_factor = L.bn_factor;
  at::parallel_for(0, L.N, std::max<int64_t>(1, kGrainValues / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const ValueStats st(L, ln, bn, n);
      const double ln_dm = ln_grad[n] * inv_c, ln_dv = ln_grad[L.N + n] * inv_c * ln_factor;
      const T* xn = x + n * C;
      const T* dyn = dy + n * C;
      T* dxn = dx + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(xn[c]), g = static_cast<double>(dyn[c]);
        const double rstd =
            static_cast<double>(A(1) / std::sqrt(static_cast<A>(st.var(c) + st.eps)));
        const double scale = st.gamma[c] * rstd;
        const double bn_dm = bn_grad[c] * inv_m, bn_dv = bn_grad[C + c] * inv_m * bn_factor;
        const double grad_mean = -st.wm0 * scale * g + st.wm1 * ln_dm + st.wm2 * bn_dm +
                                 2.0 * st.wv1 * ln_dv * (v - st.ln_mean) +
                                 2.0 * st.wv2 * bn_dv * (v - st.bn_mean[c]);
        dxn[c] = static_cast<T>(static_cast<A>(scale * g + grad_mean));
      }
    }
  });
}

// dx = k * dy + a * (x - mean_in) + b per row, from the gradients of the IN statistics
// (Appendix H; the LN and BN statistics are derived from the IN ones). ln_grad and bn_grad
// are the sums over c and over the batch of dL/dmean and dL/dvar.
template <typename T>
void dx_pass(const Layer& L, const T* dy, const T* x, T* dx, const double* m_in, const double* ln,
             const double* bn, const ConstRowGrads& rows, const double* ln_grad, const double* bn_grad) {
  const double inv_c = L.C > 0 ? 1.0 / L.C : 0.0;
  const double inv_m = L.bn_from_batch() ? 1.0 / std::max(L.count, 1.0) : 0.0;
  const double ln_factor = L.ln_factor, bn_factor = L.bn_factor, inv_divisor = L.inv_divisor;
  const double inv_s = L.inv_s, eps = L.eps;
  const double wm0 = L.wm[0], wm1 = L.wm[1], wm2 = L.wm[2];
  const double wv0 = L.wv[0], wv1 = L.wv[1], wv2 = L.wv[2];
  const int64_t S = L.S;
  using A = acc_t<T>;
  // The same split of rows over the threads as the first pass, its last rows first.
  at::parallel_for(0, L.N * L.C, row_grain(S), [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(2 * L.C);
    std::vector<A> coefficients(4 * L.C);
    double* mean = scratch.data();
    double* var = mean + L.C;
    A* centre = coefficients.data();
    A* k_dy = centre + L.C;
    A* a_xc = k_dy + L.C;
    A* b = a_xc + L.C;
    for_each_run(L, begin, end, reuse_block_rows<T>(L), [&](int64_t n, int64_t c0, int64_t c1) {
      mix_run(L, n, c0, c1, m_in, rows.v_in, ln, bn, mean, var);
      const double ln_dm = ln_grad[n] * inv_c, ln_dv = ln_grad[L.N + n] * inv_c * ln_factor;
      const double ln_mean = ln[n];
      const int64_t base = n * L.C + c0, count = c1 - c0;
      const double* mi = m_in + base;
      const double* d_mean = rows.d_mean + base;
      const double* d_var = rows.d_var + base;
      const double* gamma = L.gamma.data() + c0;
      const double* bn_mean = bn + c0;
      const double* bn_dm_sum = bn_grad + c0;
      const double* bn_dv_sum = bn_grad + L.C + c0;
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) {
        const double bn_dm = bn_dm_sum[k] * inv_m, bn_dv = bn_dv_sum[k] * inv_m * bn_factor;
        const double grad_mean = wm0 * d_mean[k] + wm1 * ln_dm + wm2 * bn_dm +
                                 2.0 * wv1 * ln_dv * (mi[k] - ln_mean) +
                                 2.0 * wv2 * bn_dv * (mi[k] - bn_mean[k]);
        const double grad_var = wv0 * d_var[k] + wv1 * ln_dv + wv2 * bn_dv;
        const double a = 2.0 * grad_var * inv_divisor;
        const A c = static_cast<A>(mi[k]);
        centre[k] = c;
        k_dy[k] = static_cast<A>(gamma[k] / std::sqrt(var[k] + eps));
        a_xc[k] = static_cast<A>(a);
        b[k] = static_cast<A>(grad_mean * inv_s + a * (static_cast<double>(c) - mi[k]));
      }
      const T* dy_run = dy + base * S;
      const T* x_run = x + base * S;
      T* dx_run = dx + base * S;
      if (S == 1) {  // one value per row (synchronized SN; the fused ops take the values path)
#pragma omp simd
        for (int64_t k = 0; k < count; ++k) {
          const A d = static_cast<A>(x_run[k]) - centre[k];
          dx_run[k] = static_cast<T>(static_cast<A>(dy_run[k]) * k_dy[k] + (d * a_xc[k] + b[k]));
        }
        return;
      }
      for (int64_t k = 0; k < count; ++k) {
        row_dx(dy_run + k * S, x_run + k * S, dx_run + k * S, S, centre[k], k_dy[k], a_xc[k], b[k]);
      }
    });
  });
}

inline GradSums grad_sums(const Layer& L, const Tensor& grad_out, const Tensor& x,
                          const double* m_in, const double* ln, const double* bn,
                          const RowGrads& rows) {
  GradSums sums(0, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sn_grad_sums", [&] {
    sums = grad_sums_pass<scalar_t>(L, grad_out.const_data_ptr<scalar_t>(),
                                    x.const_data_ptr<scalar_t>(), m_in, ln, bn, rows);
  });
  return sums;
}

inline Tensor input_grad(const Layer& L, const Tensor& grad_out, const Tensor& x, const double* m_in,
                         const double* ln, const double* bn, const ConstRowGrads& rows,
                         const double* ln_grad, const double* bn_grad) {
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sn_dx", [&] {
    dx_pass<scalar_t>(L, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                      dx.data_ptr<scalar_t>(), m_in, ln, bn, rows, ln_grad, bn_grad);
  });
  return dx;
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> param_grads(const Layer& L, GradSums& sums,
                                                              const Tensor& mean_logits) {
  const int64_t K = mean_logits.numel();
  return {doubles_like(mean_logits, sums.logits(), K), doubles_like(mean_logits, sums.logits() + 3, K),
          doubles_like(mean_logits, sums.gamma(), L.C), doubles_like(mean_logits, sums.beta(), L.C)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_reduce(
    const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
    const Tensor& bn_stats, const OptTensor& batch_count, const Tensor& mean_logits,
    const Tensor& var_logits, const OptTensor& weight, bool batch_stats, double eps,
    bool unbiased, bool has_in) {
  const Layer L = make_layer(x, mean_logits, var_logits, weight, std::nullopt, batch_count,
                             batch_stats, eps, unbiased, has_in);
  const int64_t rows = L.N * L.C;
  Tensor row_grads = stats_tensor(x, {3, L.N, L.C});
  double* base = row_grads.data_ptr<double>();
  GradSums sums = grad_sums(L, grad_out, x, mean_in.const_data_ptr<double>(),
                                  ln_stats.const_data_ptr<double>(),
                                  bn_stats.const_data_ptr<double>(),
                                  RowGrads{base, base + rows, base + 2 * rows});
  Tensor ln_grad = stats_tensor(x, {2, L.N}), bn_grad = stats_tensor(x, {2, L.C});
  std::copy(sums.ln(), sums.ln() + 2 * L.N, ln_grad.data_ptr<double>());
  std::copy(sums.bn(), sums.bn() + 2 * L.C, bn_grad.data_ptr<double>());
  auto [g_mean, g_var, g_gamma, g_beta] = param_grads(L, sums, mean_logits);
  return {row_grads, ln_grad, bn_grad, g_mean, g_var, g_gamma, g_beta};
}

Tensor backward_dx(const Tensor& grad_out, const Tensor& x, const Tensor& mean_in,
                   const Tensor& row_grads, const Tensor& ln_grad, const Tensor& bn_grad,
                   const Tensor& ln_stats, const Tensor& bn_stats, const OptTensor& batch_count,
                   const Tensor& mean_logits, const Tensor& var_logits, const OptTensor& weight,
                   bool batch_stats, double eps, bool unbiased, bool has_in) {
  const Layer L = make_layer(x, mean_logits, var_logits, weight, std::nullopt, batch_count,
                             batch_stats, eps, unbiased, has_in);
  const int64_t rows = L.N * L.C;
  const double* base = row_grads.const_data_ptr<double>();
  return input_grad(L, grad_out, x, mean_in.const_data_ptr<double>(),
                    ln_stats.const_data_ptr<double>(), bn_stats.const_data_ptr<double>(),
                    ConstRowGrads{base, base + rows, base + 2 * rows}, ln_grad.const_data_ptr<double>(),
                    bn_grad.const_data_ptr<double>());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& mean_in, const Tensor& ln_stats,
    const Tensor& bn_stats, const Tensor& mean_logits, const Tensor& var_logits,
    const OptTensor& weight, bool batch_stats, double eps, bool unbiased, bool has_in,
    bool input_grad_wanted) {
  const Layer L = make_layer(x, mean_logits, var_logits, weight, std::nullopt, std::nullopt,
                             batch_stats, eps, unbiased, has_in);
  const double* ln = ln_stats.const_data_ptr<double>();
  const double* bn = bn_stats.const_data_ptr<double>();
  if (L.S == 1) {  // one value per (n, c): mean_in is x itself (see forward_of_values)
    Tensor dx = input_grad_wanted ? at::empty_like(x) : at::empty({0}, x.options());
    GradSums sums(0, 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sn_backward_values", [&] {
      const scalar_t* dyp = grad_out.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      sums = grad_sums_of_values<scalar_t>(L, dyp, xp, ln, bn);
      if (input_grad_wanted) {
        dx_of_values<scalar_t>(L, dyp, xp, dx.data_ptr<scalar_t>(), ln, bn, sums.ln(), sums.bn());
      }
    });
    auto [g_mean, g_var, g_gamma, g_beta] = param_grads(L, sums, mean_logits);
    return {dx, g_mean, g_var, g_gamma, g_beta};
  }
  const int64_t rows = L.N * L.C;
  const std::unique_ptr<double[]> row_data(new double[3 * rows]);  // every entry is written
  const RowGrads row_grads{row_data.get(), row_data.get() + rows, row_data.get() + 2 * rows};
  const double* m_in = mean_in.const_data_ptr<double>();
  GradSums sums = grad_sums(L, grad_out, x, m_in, ln, bn, row_grads);
  Tensor dx = input_grad_wanted
                  ? input_grad(L, grad_out, x, m_in, ln, bn,
                               ConstRowGrads{row_grads.d_mean, row_grads.d_var, row_grads.v_in},
                               sums.ln(), sums.bn())
                  : at::empty({0}, x.options());
  auto [g_mean, g_var, g_gamma, g_beta] = param_grads(L, sums, mean_logits);
  return {dx, g_mean, g_var, g_gamma, g_beta};
}

inline const CpuKernels* table() {
  static const CpuKernels kernels{&moments,        &normalize,   &forward, &update_running_stats,
                                  &backward_reduce, &backward_dx, &backward};
  return &kernels;
}

}  // namespace CPU_CAPABILITY
}  // namespace sn_plugin
