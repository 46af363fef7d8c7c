// Body of one ISA's block kernels (block_kernels.h). Included by row_kernels_<isa>.cpp with
// FASTMETA_VEC_NS set; the compiler flags of that file decide the instruction set.
//
// Why fused: unfused, this tail of a conv block is five memory-bound ATen passes forward (batch-norm
// statistics, normalize, relu, pool with int64 indices) and four backward (a zero-filled pool
// gradient, its scatter, threshold_backward, two batch-norm passes) over the [N, C, H, W] conv
// output; in a second-order Conv-4 MAML step they took more time than the convolutions. Here the
// forward is two passes (shifted sums for the statistics; the pooled output with a one-byte window
// index), the backward two (the routed sums; dx), all in memory order over the [H, W] planes, and
// the full-size intermediates (normalized x, relu output, int64 indices, the zero-filled pooled
// gradient) are never written.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "block_kernels.h"

namespace fastmeta::cpu::vec::FASTMETA_VEC_NS {

// Storage types: T itself, or bf16 (as its raw uint16 bits) computed in float. Widening is exact;
// narrowing rounds to nearest even and keeps NaN a NaN, as c10::BFloat16 does. Converting in
// registers, inside the passes, costs nothing extra in memory traffic (an earlier version widened
// each plane into a float buffer first and was 20-40% slower than float32 instead of faster).
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void from_acc(float v, float* p) { *p = v; }
inline void from_acc(double v, double* p) { *p = v; }
inline void from_acc(float v, uint16_t* p) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  *p = v != v ? uint16_t{0x7fc0} : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// One vector register of lanes (GCC vector extensions): 8 float / 4 double in the avx2 build, 4 / 2
// in the baseline (SSE2) one, where 32-byte vectors were lowered to scalar shuffles (8x slower). A
// pooling row of Conv-4 is 14 windows wide, too short for the auto-vectorizer, which left these
// loops scalar and branchy (measured 4-5x slower than this).
//
// Lanes<T, N>: the vector types for N lanes of T (v; m: same-width signed integers, the type of
// comparisons; b: N window-index bytes; u, h: N uint32 / uint16, the bit patterns behind bf16
// conversion) and the shuffles the window kernels need, built from index sequences.
template <typename T, int N>
struct Lanes {
  static constexpr int L = N;
  using mi = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T v __attribute__((vector_size(N * sizeof(T))));
  typedef mi m __attribute__((vector_size(N * sizeof(T))));
  typedef std::make_unsigned_t<mi> u __attribute__((vector_size(N * sizeof(T))));
  typedef uint8_t b __attribute__((vector_size(N)));
  typedef uint16_t h __attribute__((vector_size(N * 2)));
  // a, c: 2N consecutive elements; evens/odds: the N at even/odd positions.
  static v evens(v a, v c) { return deinterleave<0>(a, c, std::make_index_sequence<N>{}); }
  static v odds(v a, v c) { return deinterleave<1>(a, c, std::make_index_sequence<N>{}); }
  // The inverse: e0 o0 e1 o1 ... as two registers (the first and the second half).
  static v zip_lo(v e, v o) { return interleave<0>(e, o, std::make_index_sequence<N>{}); }
  static v zip_hi(v e, v o) { return interleave<N / 2>(e, o, std::make_index_sequence<N>{}); }
  static m iota() { return iota(std::make_index_sequence<N>{}); }

 private:
  template <int Offset, std::size_t... I>
  static v deinterleave(v a, v c, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, c, (2 * I + Offset)...);
  }
  template <int Offset, std::size_t... I>
  static v interleave(v e, v o, std::index_sequence<I...>) {
    return __builtin_shufflevector(e, o, (I / 2 + Offset + (I % 2) * N)...);
  }
  template <std::size_t... I>
  static m iota(std::index_sequence<I...>) {
    return m{static_cast<mi>(I)...};
  }
};
// Narrow: one SSE register; Wide: the widest register this file is compiled for. A row takes the
// widest that fits in it (Conv-4: 14 windows wide, then 7, 3, 1).
template <typename T>
using Narrow = Lanes<T, 16 / sizeof(T)>;
#if defined(__AVX2__)
template <typename T>
using Wide = Lanes<T, 32 / sizeof(T)>;
#else
template <typename T>
using Wide = Narrow<T>;
#endif

template <typename V>
inline V load_v(const void* p) {
  V r;
  std::memcpy(&r, p, sizeof(V));
  return r;
}
template <typename V>
inline void store_v(void* p, V r) { std::memcpy(p, &r, sizeof(V)); }

// Window index as a lane mask type: uint8 bytes widened to the lanes' integer width.
template <typename Ln>
inline typename Ln::m load_idx(const uint8_t* p) {
  return __builtin_convertvector(load_v<typename Ln::b>(p), typename Ln::m);
}

template <typename Ln, typename S>
inline typename Ln::v load_s(const S* p) {
  if constexpr (std::is_same_v<S, uint16_t>) {
    const typename Ln::u wide = __builtin_convertvector(load_v<typename Ln::h>(p), typename Ln::u) << 16;
    return (typename Ln::v)wide;  // GCC vector cast: the same bits, reinterpreted
  } else {
    return load_v<typename Ln::v>(p);
  }
}

template <typename Ln, typename S>
inline void store_s(S* p, typename Ln::v x) {
  if constexpr (std::is_same_v<S, uint16_t>) {
    const typename Ln::u u = (typename Ln::u)x;
    const typename Ln::u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const typename Ln::u bits = (x != x) ? (typename Ln::u{} + 0x7fc0u) : rounded;
    store_v(p, __builtin_convertvector(bits, typename Ln::h));
  } else {
    store_v(p, x);
  }
}

// One plane's shifted sums: s1 += sum (x - shift), s2 += sum (x - shift)^2, in one pass (four
// vector accumulators: one would wait on the add latency; totals in double). With the shift near
// the mean (the caller uses one element of the channel) the variance (s2 - s1^2 / M) / M does not
// cancel catastrophically.
template <typename T, typename S>
void stats_t(const S* x, int64_t n, T shift, double* s1, double* s2) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  constexpr int L = Ln::L;
  V a1[4] = {}, a2[4] = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int u = 0; u < 4; ++u) {
      const V d = load_s<Ln>(x + i + u * L) - shift;
      a1[u] += d;
      a2[u] += d * d;
    }
  }
  for (; i + L <= n; i += L) {
    const V d = load_s<Ln>(x + i) - shift;
    a1[0] += d;
    a2[0] += d * d;
  }
  T t1 = 0, t2 = 0;
  for (; i < n; ++i) {
    const T d = to_acc(x[i]) - shift;
    t1 += d;
    t2 += d * d;
  }
  const V b1 = (a1[0] + a1[1]) + (a1[2] + a1[3]), b2 = (a2[0] + a2[1]) + (a2[2] + a2[3]);
  double d1 = static_cast<double>(t1), d2 = static_cast<double>(t2);
  for (int l = 0; l < L; ++l) {
    d1 += static_cast<double>(b1[l]);
    d2 += static_cast<double>(b2[l]);
  }
  *s1 += d1;
  *s2 += d2;
}

// Row kernels over one output row of windows j in [0, wo) and its two input rows r0, r1, with Ln's
// lanes; a row of at least L windows ends with a group overlapping the previous one (lanes already
// done are recomputed identically in the forward and masked out in the backward), so there is no
// scalar tail. Rows narrower than the narrowest register go through the *_scalar versions.

// Forward: z = x * scale + shift; max_pool2d's rule (the first maximum in row-major order wins ties:
// a right or lower element only when strictly greater), then relu (index 4: the maximum is <= 0,
// so no element of the window gets gradient).
template <typename Ln, typename T, typename S>
inline void row_fwd(const S* r0, const S* r1, int64_t wo, T scale, T shift, T slope, S* o, uint8_t* k) {
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  for (int64_t gs = 0; gs < wo; gs += L) {
    const int64_t j = std::min(gs, wo - L);
    const V a0 = load_s<Ln>(r0 + 2 * j), a1 = load_s<Ln>(r0 + 2 * j + L);
    const V c0 = load_s<Ln>(r1 + 2 * j), c1 = load_s<Ln>(r1 + 2 * j + L);
    const V za = Ln::evens(a0, a1) * scale + shift, zb = Ln::odds(a0, a1) * scale + shift;
    const V zc = Ln::evens(c0, c1) * scale + shift, zd = Ln::odds(c0, c1) * scale + shift;
    const M right = zb > za, right_low = zd > zc;
    const V t = right ? zb : za, u = right_low ? zd : zc;
    const M kt = right & 1, ku = (right_low & 1) + 2;
    const M down = u > t;
    V best = down ? u : t;
    M kk = down ? ku : kt;
    const M pos = best > T(0);
    best = pos ? best : best * slope + T(0);  // + 0: slope 0 gives +0, as relu does
    kk = pos ? kk : kk + 4;
    store_s<Ln>(o + j, best);
    store_v(k + j, __builtin_convertvector(kk, typename Ln::b));
  }
}

// Rows narrower than one register. Written without data-dependent branches (about half the
// windows are all <= 0, which makes a branch a coin flip): selects and 0/1 weights only.
template <typename T, typename S>
inline void row_fwd_scalar(const S* r0, const S* r1, int64_t wo, T scale, T shift, T slope, S* o, uint8_t* k) {
  for (int64_t j = 0; j < wo; ++j) {
    const T a = to_acc(r0[2 * j]) * scale + shift, b = to_acc(r0[2 * j + 1]) * scale + shift;
    const T c = to_acc(r1[2 * j]) * scale + shift, d = to_acc(r1[2 * j + 1]) * scale + shift;
    const int right = b > a, right_low = d > c;
    const T t = right ? b : a, u = right_low ? d : c;
    const int down = u > t;
    const T best = down ? u : t;
    const int kk = down ? 2 + right_low : right;
    const int pos = best > T(0);
    from_acc(pos ? best : best * slope + T(0), o + j);
    k[j] = static_cast<uint8_t>(pos ? kk : kk + 4);
  }
}

// Backward, pass 1: adds sum dz and sum dz * (x - mean) over the row's routed elements (one per
// window at most; the routed x is selected from the window's four elements) to sg, sgx.
template <typename Ln, typename T, typename S>
inline void row_sums(const S* r0, const S* r1, const S* g, const uint8_t* k, int64_t wo, T mean, T slope,
                     typename Ln::v& vg, typename Ln::v& vgx) {
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  for (int64_t gs = 0; gs < wo; gs += L) {
    const int64_t j = std::min(gs, wo - L);
    const M fresh = Ln::iota() >= static_cast<int32_t>(gs - j);  // lanes not done by the previous group
    const M kk = load_idx<Ln>(k + j);
    const V a0 = load_s<Ln>(r0 + 2 * j), a1 = load_s<Ln>(r0 + 2 * j + L);
    const V c0 = load_s<Ln>(r1 + 2 * j), c1 = load_s<Ln>(r1 + 2 * j + L);
    const V top = (kk & 1) ? Ln::odds(a0, a1) : Ln::evens(a0, a1);
    const V bot = (kk & 1) ? Ln::odds(c0, c1) : Ln::evens(c0, c1);
    const V xs = (kk & 2) ? bot : top;
    const V routed = fresh ? load_s<Ln>(g + j) * (kk < 4 ? V{} + T(1) : V{} + slope) : V{};
    vg += routed;
    vgx += routed * (xs - mean);
  }
}

template <typename T, typename S>
inline void row_sums_scalar(const S* r0, const S* r1, const S* g, const uint8_t* k, int64_t wo, T mean, T slope,
                            T& sg, T& sgx) {
  for (int64_t j = 0; j < wo; ++j) {
    const int kk = k[j];
    const T xs = to_acc(((kk & 2) ? r1 : r0)[2 * j + (kk & 1)]);
    const T routed = to_acc(g[j]) * (kk < 4 ? T(1) : slope);
    sg += routed;
    sgx += routed * (xs - mean);
  }
}

// Backward, pass 2, for the two input rows of one output row: dx = c1 * (x - mean) + c0 + kg * dz
// (dz = the window's gradient at its routed element, 0 elsewhere), written once per element (a
// dense pass followed by a scatter-add would write the row twice).
template <typename Ln, typename T, typename S>
inline void row_dx(const S* x0, const S* x1, S* d0, S* d1, const S* g, const uint8_t* k, int64_t wo, T mean, T c1,
                   T c0, T kg, T slope) {
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  for (int64_t gs = 0; gs < wo; gs += L) {
    const int64_t j = std::min(gs, wo - L);  // the overlap recomputes identical values
    const M kk = load_idx<Ln>(k + j), p = kk & 3;
    const V gk = load_s<Ln>(g + j) * (kk < 4 ? V{} + kg : V{} + kg * slope);
    const V e0 = p == 0 ? gk : V{}, e1 = p == 1 ? gk : V{};
    const V e2 = p == 2 ? gk : V{}, e3 = p == 3 ? gk : V{};
    store_s<Ln>(d0 + 2 * j, (load_s<Ln>(x0 + 2 * j) - mean) * c1 + c0 + Ln::zip_lo(e0, e1));
    store_s<Ln>(d0 + 2 * j + L, (load_s<Ln>(x0 + 2 * j + L) - mean) * c1 + c0 + Ln::zip_hi(e0, e1));
    store_s<Ln>(d1 + 2 * j, (load_s<Ln>(x1 + 2 * j) - mean) * c1 + c0 + Ln::zip_lo(e2, e3));
    store_s<Ln>(d1 + 2 * j + L, (load_s<Ln>(x1 + 2 * j + L) - mean) * c1 + c0 + Ln::zip_hi(e2, e3));
  }
}

template <typename T, typename S>
inline void row_dx_scalar(const S* x0, const S* x1, S* d0, S* d1, const S* g, const uint8_t* k, int64_t wo, T mean,
                          T c1, T c0, T kg, T slope) {
  for (int64_t j = 0; j < wo; ++j) {
    const int kk = k[j] & 3;
    const T gk = (k[j] < 4 ? kg : kg * slope) * to_acc(g[j]);
    from_acc((to_acc(x0[2 * j]) - mean) * c1 + c0 + (kk == 0 ? gk : T(0)), d0 + 2 * j);
    from_acc((to_acc(x0[2 * j + 1]) - mean) * c1 + c0 + (kk == 1 ? gk : T(0)), d0 + 2 * j + 1);
    from_acc((to_acc(x1[2 * j]) - mean) * c1 + c0 + (kk == 2 ? gk : T(0)), d1 + 2 * j);
    from_acc((to_acc(x1[2 * j + 1]) - mean) * c1 + c0 + (kk == 3 ? gk : T(0)), d1 + 2 * j + 1);
  }
}

// Forward of one H x W plane: the pooled plane and its window indices (see block_kernels.h).
template <typename T, typename S>
void fwd_plane_t(const S* x, int64_t h, int64_t w, T scale, T shift, T slope, S* out, uint8_t* idx) {
  const int64_t ho = h / 2, wo = w / 2;
  // A NaN or infinity anywhere in the channel makes its statistics, and so every output of the
  // channel, NaN in ATen's batch norm: the same here, without NaN tests in the window loops.
  if (!std::isfinite(scale) || !std::isfinite(shift)) {
    for (int64_t p = 0; p < ho * wo; ++p) {
      from_acc(std::numeric_limits<T>::quiet_NaN(), out + p);
      idx[p] = 4;
    }
    return;
  }
  for (int64_t rr = 0; rr < ho; ++rr) {
    const S* r0 = x + 2 * rr * w;
    if (wo >= Wide<T>::L)
      row_fwd<Wide<T>>(r0, r0 + w, wo, scale, shift, slope, out + rr * wo, idx + rr * wo);
    else if (wo >= Narrow<T>::L)
      row_fwd<Narrow<T>>(r0, r0 + w, wo, scale, shift, slope, out + rr * wo, idx + rr * wo);
    else
      row_fwd_scalar(r0, r0 + w, wo, scale, shift, slope, out + rr * wo, idx + rr * wo);
  }
}

// Backward, pass 1, one plane: adds sum dz and sum dz * (x - mean) (dz: the routed gradient; per
// plane in T, into double totals). Branch-free over the windows in the vector rows: about half of
// them route nothing (maximum <= 0), so a branch on the index mispredicts half the time.
template <typename T, typename S>
void bwd_sums_t(const S* x, int64_t h, int64_t w, const S* grad_out, const uint8_t* idx, T mean, T slope,
                double* sdz, double* sdzx) {
  const int64_t ho = h / 2, wo = w / 2;
  T sg = 0, sgx = 0;
  // Vector accumulators across the plane's rows, reduced once at the end.
  auto rows = [&](auto lanes) {
    using Ln = decltype(lanes);
    typename Ln::v vg{}, vgx{};
    for (int64_t rr = 0; rr < ho; ++rr)
      row_sums<Ln>(x + 2 * rr * w, x + (2 * rr + 1) * w, grad_out + rr * wo, idx + rr * wo, wo, mean, slope, vg,
                   vgx);
    for (int l = 0; l < Ln::L; ++l) {
      sg += vg[l];
      sgx += vgx[l];
    }
  };
  if (wo >= Wide<T>::L) {
    rows(Wide<T>{});
  } else if (wo >= Narrow<T>::L) {
    rows(Narrow<T>{});
  } else {
    for (int64_t rr = 0; rr < ho; ++rr)
      row_sums_scalar(x + 2 * rr * w, x + (2 * rr + 1) * w, grad_out + rr * wo, idx + rr * wo, wo, mean, slope, sg,
                      sgx);
  }
  *sdz += static_cast<double>(sg);
  *sdzx += static_cast<double>(sgx);
}

// Backward, pass 2, one plane: dx = c1 * (x - mean) + c0 + kg * dz, each element written once.
template <typename T, typename S>
void dx_plane_t(const S* x, int64_t h, int64_t w, const S* grad_out, const uint8_t* idx, T mean, T c1, T c0, T kg,
                T slope, S* dx) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t rr = 0; rr < ho; ++rr) {
    const S* x0 = x + 2 * rr * w;
    S* d0 = dx + 2 * rr * w;
    const S* g = grad_out + rr * wo;
    const uint8_t* k = idx + rr * wo;
    if (wo >= Wide<T>::L)
      row_dx<Wide<T>>(x0, x0 + w, d0, d0 + w, g, k, wo, mean, c1, c0, kg, slope);
    else if (wo >= Narrow<T>::L)
      row_dx<Narrow<T>>(x0, x0 + w, d0, d0 + w, g, k, wo, mean, c1, c0, kg, slope);
    else
      row_dx_scalar(x0, x0 + w, d0, d0 + w, g, k, wo, mean, c1, c0, kg, slope);
    if (w % 2 == 1) {  // the last column is in no window: its dz is 0
      from_acc((to_acc(x0[w - 1]) - mean) * c1 + c0, d0 + w - 1);
      from_acc((to_acc(x0[2 * w - 1]) - mean) * c1 + c0, d0 + 2 * w - 1);
    }
  }
  for (int64_t p = 2 * ho * w; p < h * w; ++p) from_acc((to_acc(x[p]) - mean) * c1 + c0, dx + p);  // odd h: last row
}

// ---------------------------------------------------------------------------------------- NHWC
// The same passes for channels_last tensors ([N, H, W, C] in memory; the channels_last speed
// mode, where oneDNN's convolutions are 13-15% faster here). One image per call; the lanes run
// over channels, so every load is contiguous and no shuffles are needed. Channels past the last
// full register go through the same code one lane at a time.

// Per-channel shifted sums over one image's h*w positions: s1[c] += sum (x - shift[c]), s2[c] +=
// sum (x - shift[c])^2 (sums in T within the image, added to the double totals once).
template <typename T, typename S>
void stats_nhwc_t(const S* x, int64_t positions, int64_t c, const T* shift, double* s1, double* s2) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  constexpr int L = Ln::L;
  int64_t c0 = 0;
  for (; c0 + L <= c; c0 += L) {
    const V sh = load_v<V>(shift + c0);
    V a1{}, a2{}, b1{}, b2{};
    int64_t p = 0;
    for (; p + 2 <= positions; p += 2) {  // two independent chains
      const V d = load_s<Ln>(x + p * c + c0) - sh, e = load_s<Ln>(x + (p + 1) * c + c0) - sh;
      a1 += d;
      a2 += d * d;
      b1 += e;
      b2 += e * e;
    }
    if (p < positions) {
      const V d = load_s<Ln>(x + p * c + c0) - sh;
      a1 += d;
      a2 += d * d;
    }
    for (int l = 0; l < L; ++l) {
      s1[c0 + l] += static_cast<double>(a1[l] + b1[l]);
      s2[c0 + l] += static_cast<double>(a2[l] + b2[l]);
    }
  }
  for (; c0 < c; ++c0) {
    T a1 = 0, a2 = 0;
    for (int64_t p = 0; p < positions; ++p) {
      const T d = to_acc(x[p * c + c0]) - shift[c0];
      a1 += d;
      a2 += d * d;
    }
    s1[c0] += static_cast<double>(a1);
    s2[c0] += static_cast<double>(a2);
  }
}

// Forward of one image: out and idx are its [h/2, w/2, C] outputs.
template <typename T, typename S>
void fwd_nhwc_t(const S* x, int64_t h, int64_t w, int64_t c, const T* scale, const T* shift, T slope, S* out,
                uint8_t* idx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t i = 0; i < ho; ++i)
    for (int64_t j = 0; j < wo; ++j) {
      const S* p00 = x + ((2 * i) * w + 2 * j) * c;
      const S* p01 = p00 + c;
      const S* p10 = p00 + w * c;
      const S* p11 = p10 + c;
      S* o = out + (i * wo + j) * c;
      uint8_t* k = idx + (i * wo + j) * c;
      int64_t c0 = 0;
      for (; c0 + L <= c; c0 += L) {
        const V sc = load_v<V>(scale + c0), sh = load_v<V>(shift + c0);
        const V za = load_s<Ln>(p00 + c0) * sc + sh, zb = load_s<Ln>(p01 + c0) * sc + sh;
        const V zc = load_s<Ln>(p10 + c0) * sc + sh, zd = load_s<Ln>(p11 + c0) * sc + sh;
        const M right = zb > za, right_low = zd > zc;
        const V t = right ? zb : za, u = right_low ? zd : zc;
        const M down = u > t;
        V best = down ? u : t;
        M kk = down ? (right_low & 1) + 2 : (right & 1);
        const M pos = best > T(0);
        best = pos ? best : best * slope + T(0);
        kk = pos ? kk : kk + 4;
        store_s<Ln>(o + c0, best);
        store_v(k + c0, __builtin_convertvector(kk, typename Ln::b));
      }
      for (; c0 < c; ++c0) {
        const T a = to_acc(p00[c0]) * scale[c0] + shift[c0], b = to_acc(p01[c0]) * scale[c0] + shift[c0];
        const T cc = to_acc(p10[c0]) * scale[c0] + shift[c0], d = to_acc(p11[c0]) * scale[c0] + shift[c0];
        const int right = b > a, right_low = d > cc;
        const T t = right ? b : a, u = right_low ? d : cc;
        const int down = u > t;
        const T best = down ? u : t;
        const int kk = down ? 2 + right_low : right;
        from_acc(best > T(0) ? best : best * slope + T(0), o + c0);
        k[c0] = static_cast<uint8_t>(best > T(0) ? kk : kk + 4);
      }
    }
}

// Backward pass 1 of one image: sdz[c] += sum dz, sdzx[c] += sum dz * (x - mean[c]).
template <typename T, typename S>
void bwd_sums_nhwc_t(const S* x, int64_t h, int64_t w, int64_t c, const S* grad_out, const uint8_t* idx,
                     const T* mean, T slope, double* sdz, double* sdzx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  const int64_t ho = h / 2, wo = w / 2;
  int64_t c0 = 0;
  for (; c0 + L <= c; c0 += L) {
    const V mn = load_v<V>(mean + c0);
    V vg{}, vgx{};
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t j = 0; j < wo; ++j) {
        const S* p00 = x + ((2 * i) * w + 2 * j) * c + c0;
        const int64_t o = (i * wo + j) * c + c0;
        const M kk = load_idx<Ln>(idx + o);
        const V a = load_s<Ln>(p00), b = load_s<Ln>(p00 + c);
        const V cc = load_s<Ln>(p00 + w * c), d = load_s<Ln>(p00 + w * c + c);
        const V xs = (kk & 2) ? ((kk & 1) ? d : cc) : ((kk & 1) ? b : a);
        const V routed = load_s<Ln>(grad_out + o) * (kk < 4 ? V{} + T(1) : V{} + slope);
        vg += routed;
        vgx += routed * (xs - mn);
      }
    for (int l = 0; l < L; ++l) {
      sdz[c0 + l] += static_cast<double>(vg[l]);
      sdzx[c0 + l] += static_cast<double>(vgx[l]);
    }
  }
  for (; c0 < c; ++c0) {
    T sg = 0, sgx = 0;
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t j = 0; j < wo; ++j) {
        const int64_t o = (i * wo + j) * c + c0;
        const int kk = idx[o] & 3;
        const T xs = to_acc(x[((2 * i + (kk >> 1)) * w + 2 * j + (kk & 1)) * c + c0]);
        const T g = to_acc(grad_out[o]) * (idx[o] < 4 ? T(1) : slope);
        sg += g;
        sgx += g * (xs - mean[c0]);
      }
    sdz[c0] += static_cast<double>(sg);
    sdzx[c0] += static_cast<double>(sgx);
  }
}

// Backward pass 2 of one image: dx = c1 * (x - mean) + c0 + kg * dz, each element written once.
template <typename T, typename S>
void dx_nhwc_t(const S* x, int64_t h, int64_t w, int64_t c, const S* grad_out, const uint8_t* idx, const T* mean,
               const T* c1, const T* c0v, const T* kg, T slope, S* dx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  const int64_t ho = h / 2, wo = w / 2;
  auto dense = [&](int64_t pos) {  // an element in no window: dz = 0
    int64_t ch = 0;
    for (; ch + L <= c; ch += L)
      store_s<Ln>(dx + pos * c + ch,
                  (load_s<Ln>(x + pos * c + ch) - load_v<V>(mean + ch)) * load_v<V>(c1 + ch) + load_v<V>(c0v + ch));
    for (; ch < c; ++ch) from_acc((to_acc(x[pos * c + ch]) - mean[ch]) * c1[ch] + c0v[ch], dx + pos * c + ch);
  };
  for (int64_t i = 0; i < ho; ++i) {
    for (int64_t j = 0; j < wo; ++j) {
      const int64_t q00 = (2 * i) * w + 2 * j, q01 = q00 + 1, q10 = q00 + w, q11 = q10 + 1;
      const int64_t o = (i * wo + j) * c;
      int64_t ch = 0;
      for (; ch + L <= c; ch += L) {
        const V mn = load_v<V>(mean + ch), a1 = load_v<V>(c1 + ch), a0 = load_v<V>(c0v + ch);
        const M k4 = load_idx<Ln>(idx + o + ch), kk = k4 & 3;
        const V gk = load_s<Ln>(grad_out + o + ch) * load_v<V>(kg + ch) * (k4 < 4 ? V{} + T(1) : V{} + slope);
        store_s<Ln>(dx + q00 * c + ch, (load_s<Ln>(x + q00 * c + ch) - mn) * a1 + a0 + (kk == 0 ? gk : V{}));
        store_s<Ln>(dx + q01 * c + ch, (load_s<Ln>(x + q01 * c + ch) - mn) * a1 + a0 + (kk == 1 ? gk : V{}));
        store_s<Ln>(dx + q10 * c + ch, (load_s<Ln>(x + q10 * c + ch) - mn) * a1 + a0 + (kk == 2 ? gk : V{}));
        store_s<Ln>(dx + q11 * c + ch, (load_s<Ln>(x + q11 * c + ch) - mn) * a1 + a0 + (kk == 3 ? gk : V{}));
      }
      for (; ch < c; ++ch) {
        const int kk = idx[o + ch] & 3;
        const T gk = kg[ch] * to_acc(grad_out[o + ch]) * (idx[o + ch] < 4 ? T(1) : slope);
        const int64_t q[4] = {q00, q01, q10, q11};
        for (int e = 0; e < 4; ++e)
          from_acc((to_acc(x[q[e] * c + ch]) - mean[ch]) * c1[ch] + c0v[ch] + (kk == e ? gk : T(0)),
                   dx + q[e] * c + ch);
      }
    }
    if (w % 2 == 1) {  // the last column is in no window
      dense((2 * i) * w + w - 1);
      dense((2 * i + 1) * w + w - 1);
    }
  }
  for (int64_t pos = 2 * ho * w; pos < h * w; ++pos) dense(pos);  // odd h: the last row
}

// ---------------------------------------------------------------------------------------- no pool
// BatchNorm -> ReLU/LeakyReLU without the pool (the inner layers of a ResNet-12 block): element-wise
// given the channel constants, so one kernel per layout over contiguous runs (__restrict__: the
// uint8_t idx may alias anything, which otherwise keeps the compiler from vectorizing the loops): idx[p] is 0 where
// z > 0 and 4 elsewhere (the pooled kernels' code with the window position 0), so dz = g where
// idx < 4 and slope * g elsewhere. The loops are simple enough for the auto-vectorizer.

// Forward of n elements of one channel (an NCHW plane): out = leaky(x * scale + shift). Written
// with the lane types: the auto-vectorizer left the plain loop scalar (~8x slower than the pooled
// kernel on the same plane). "+ T(0)" turns the -0 of a negative z times slope 0 into +0, as relu.
template <typename T, typename S>
void fwd_flat_t(const S* __restrict__ x, int64_t n, T scale, T shift, T slope, S* __restrict__ out,
                uint8_t* __restrict__ idx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    const V z = load_s<Ln>(x + p) * scale + shift;
    const M pos = z > T(0);  // all ones where z > 0
    store_s<Ln>(out + p, pos ? z : z * slope + T(0));
    store_v(idx + p, __builtin_convertvector(~pos & 4, typename Ln::b));
  }
  for (; p < n; ++p) {
    const T z = to_acc(x[p]) * scale + shift;
    const bool pos = z > T(0);
    from_acc(pos ? z : z * slope + T(0), out + p);
    idx[p] = pos ? 0 : 4;
  }
}

template <typename V>
inline auto lane_sum(V v) {
  auto s = v[0];
  for (int i = 1; i < static_cast<int>(sizeof(V) / sizeof(s)); ++i) s += v[i];
  return s;
}

// Backward pass 1 of n elements of one channel: *sdz += sum dz, *sdzx += sum dz (x - mean).
template <typename T, typename S>
void bwd_sums_flat_t(const S* __restrict__ x, int64_t n, const S* __restrict__ grad_out,
                     const uint8_t* __restrict__ idx, T mean, T slope, double* sdz, double* sdzx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  constexpr int L = Ln::L;
  V vg = {}, vgx = {};
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    const V g = load_s<Ln>(grad_out + p);
    const V dz = (load_idx<Ln>(idx + p) < 4) ? g : g * slope;
    vg += dz;
    vgx += dz * (load_s<Ln>(x + p) - mean);
  }
  T sg = lane_sum(vg), sgx = lane_sum(vgx);
  for (; p < n; ++p) {
    const T dz = to_acc(grad_out[p]) * (idx[p] < 4 ? T(1) : slope);
    sg += dz;
    sgx += dz * (to_acc(x[p]) - mean);
  }
  *sdz += static_cast<double>(sg);
  *sdzx += static_cast<double>(sgx);
}

// Backward pass 2 of n elements of one channel: dx = c1 (x - mean) + c0 + kg dz.
template <typename T, typename S>
void dx_flat_t(const S* __restrict__ x, int64_t n, const S* __restrict__ grad_out, const uint8_t* __restrict__ idx,
               T mean, T c1, T c0, T kg, T slope, S* __restrict__ dx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  constexpr int L = Ln::L;
  const T kn = kg * slope;
  const V kgv = V{} + kg, knv = V{} + kn;
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    const V k = (load_idx<Ln>(idx + p) < 4) ? kgv : knv;
    store_s<Ln>(dx + p, (load_s<Ln>(x + p) - mean) * c1 + c0 + load_s<Ln>(grad_out + p) * k);
  }
  for (; p < n; ++p)
    from_acc((to_acc(x[p]) - mean) * c1 + c0 + to_acc(grad_out[p]) * (idx[p] < 4 ? kg : kn), dx + p);
}

// channels_last: positions x c elements of one image, per-channel constant arrays; vectorized over
// runs of L channels (the channel tail scalar), like the NCHW kernels above.
template <typename T, typename S>
void fwd_flat_nhwc_t(const S* __restrict__ x, int64_t positions, int64_t c, const T* scale, const T* shift,
                     T slope, S* __restrict__ out, uint8_t* __restrict__ idx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  for (int64_t q = 0; q < positions; ++q) {
    const int64_t base = q * c;
    int64_t ch = 0;
    for (; ch + L <= c; ch += L) {
      const V z = load_s<Ln>(x + base + ch) * load_v<V>(scale + ch) + load_v<V>(shift + ch);
      const M pos = z > T(0);
      store_s<Ln>(out + base + ch, pos ? z : z * slope + T(0));
      store_v(idx + base + ch, __builtin_convertvector(~pos & 4, typename Ln::b));
    }
    for (; ch < c; ++ch) {
      const int64_t p = base + ch;
      const T z = to_acc(x[p]) * scale[ch] + shift[ch];
      const bool pos = z > T(0);
      from_acc(pos ? z : z * slope + T(0), out + p);
      idx[p] = pos ? 0 : 4;
    }
  }
}

template <typename T, typename S>
void bwd_sums_flat_nhwc_t(const S* __restrict__ x, int64_t positions, int64_t c, const S* __restrict__ grad_out,
                          const uint8_t* __restrict__ idx, const T* mean, T slope, double* sdz, double* sdzx) {
  // Per-image partial sums in T for a block of up to B vectors of L channels, walking the positions
  // in memory order (one contiguous run of the block's channels per position), added to the double
  // totals once per image; the channel tail (c % L) scalar.
  using Ln = Wide<T>;
  using V = typename Ln::v;
  constexpr int L = Ln::L;
  constexpr int B = 8;
  const int64_t cv = c - c % L;
  for (int64_t c0 = 0; c0 < cv; c0 += B * L) {
    const int nb = static_cast<int>(std::min<int64_t>(B, (cv - c0) / L));
    V m[B], sg[B], sgx[B];
    for (int j = 0; j < nb; ++j) {
      m[j] = load_v<V>(mean + c0 + j * L);
      sg[j] = V{};
      sgx[j] = V{};
    }
    for (int64_t q = 0; q < positions; ++q) {
      const int64_t p0 = q * c + c0;
      for (int j = 0; j < nb; ++j) {
        const int64_t p = p0 + j * L;
        const V g = load_s<Ln>(grad_out + p);
        const V dz = (load_idx<Ln>(idx + p) < 4) ? g : g * slope;
        sg[j] += dz;
        sgx[j] += dz * (load_s<Ln>(x + p) - m[j]);
      }
    }
    for (int j = 0; j < nb; ++j)
      for (int k = 0; k < L; ++k) {
        sdz[c0 + j * L + k] += static_cast<double>(sg[j][k]);
        sdzx[c0 + j * L + k] += static_cast<double>(sgx[j][k]);
      }
  }
  for (int64_t ch = cv; ch < c; ++ch) {
    T sg = 0, sgx = 0;
    for (int64_t q = 0; q < positions; ++q) {
      const int64_t p = q * c + ch;
      const T dz = to_acc(grad_out[p]) * (idx[p] < 4 ? T(1) : slope);
      sg += dz;
      sgx += dz * (to_acc(x[p]) - mean[ch]);
    }
    sdz[ch] += static_cast<double>(sg);
    sdzx[ch] += static_cast<double>(sgx);
  }
}

template <typename T, typename S>
void dx_flat_nhwc_t(const S* __restrict__ x, int64_t positions, int64_t c, const S* __restrict__ grad_out,
                    const uint8_t* __restrict__ idx, const T* mean, const T* c1, const T* c0v, const T* kg, T slope,
                    S* __restrict__ dx) {
  using Ln = Wide<T>;
  using V = typename Ln::v;
  constexpr int L = Ln::L;
  for (int64_t q = 0; q < positions; ++q) {
    const int64_t base = q * c;
    int64_t ch = 0;
    for (; ch + L <= c; ch += L) {
      const V k = load_v<V>(kg + ch);
      const V kk = (load_idx<Ln>(idx + base + ch) < 4) ? k : k * slope;
      store_s<Ln>(dx + base + ch, (load_s<Ln>(x + base + ch) - load_v<V>(mean + ch)) * load_v<V>(c1 + ch) +
                                      load_v<V>(c0v + ch) + load_s<Ln>(grad_out + base + ch) * kk);
    }
    for (; ch < c; ++ch) {
      const int64_t p = base + ch;
      const T k = idx[p] < 4 ? kg[ch] : kg[ch] * slope;
      from_acc((to_acc(x[p]) - mean[ch]) * c1[ch] + c0v[ch] + to_acc(grad_out[p]) * k, dx + p);
    }
  }
}

// Double backward (second-order MAML differentiates the inner gradient, i.e. the backward). Per
// channel, with M elements, s = invstd, xhat = (x - mean) s, dz the routed gradient, db = sum dz,
// dg = sum dz xhat, and the backward's dx = gamma s (dz - db / M - xhat dg / M): for
// L = sum a dx + a_gamma dg + a_beta db, with A = sum a, AX = sum a xhat, ADZ = sum a dz,
//   dL/d dz_j  = gamma s (a_j - A / M - xhat_j AX / M) + a_gamma xhat_j + a_beta
//   dL/d gamma = s P,  P = ADZ - db A / M - dg AX / M
//   dL/d x_j   = s (H_j - sum(H) / M - xhat_j sum(H xhat) / M) - gamma P s^2 xhat_j / M,
//     H_k = a_gamma dz_k - (gamma s / M)(dz_k AX + dg a_k)      (dL/d xhat_k at fixed s),
//     sum(H) = a_gamma db - (gamma s / M)(db AX + dg A),  sum(H xhat) = a_gamma dg - 2 (gamma s / M) dg AX,
// using d xhat_k / d x_j = s (delta_kj - 1 / M - xhat_k xhat_j / M). The activation enters only
// through the routing: output o's gradient reaches its routed element as dz = r_o g_o, with r_o = 1
// (z > 0) or the slope, a piecewise-constant factor, so dL/d g_o = r_o dL/d dz. Without the pool
// each output routes to its own element. Only the create_graph path (MAML's support set, a few
// images per task) runs this, so it is plain scalar code in double.
template <typename T>
void block_bwd2_t(const T* a, double a_gamma, double a_beta, const T* grad_out, const uint8_t* idx,
                  int64_t out_img_stride, const T* x, int64_t n, int64_t img_stride, int64_t h, int64_t w, T gamma_t,
                  double mean, double invstd, double slope, bool pool, T* g_grad_out, T* g_x, double* g_gamma) {
  const int64_t hw = h * w, ho = pool ? h / 2 : h, wo = pool ? w / 2 : w;
  const double count = static_cast<double>(n * hw), s = invstd, gamma = static_cast<double>(gamma_t);
  auto routed_pos = [&](int64_t rr, int64_t j, int k) {
    const int kk = k & 3;
    return pool ? (2 * rr + (kk >> 1)) * w + 2 * j + (kk & 1) : rr * w + j;
  };
  auto rate = [&](int k) { return k < 4 ? 1.0 : slope; };
  double A = 0.0, AX = 0.0, db = 0.0, dg = 0.0, ADZ = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * img_stride;
    if (a != nullptr) {
      const T* ai = a + i * img_stride;
      for (int64_t p = 0; p < hw; ++p) {
        A += static_cast<double>(ai[p]);
        AX += static_cast<double>(ai[p]) * (static_cast<double>(xi[p]) - mean);
      }
    }
    for (int64_t rr = 0; rr < ho; ++rr)
      for (int64_t j = 0; j < wo; ++j) {
        const int kk = idx[i * out_img_stride + rr * wo + j];
        if (rate(kk) == 0.0) continue;
        const int64_t p = routed_pos(rr, j, kk);
        const double gv = rate(kk) * static_cast<double>(grad_out[i * out_img_stride + rr * wo + j]);
        db += gv;
        dg += gv * (static_cast<double>(xi[p]) - mean);
        if (a != nullptr) ADZ += gv * static_cast<double>(a[i * img_stride + p]);
      }
  }
  AX *= s;
  dg *= s;
  const double gs_m = gamma * s / count;
  const double P = ADZ - db * A / count - dg * AX / count;
  *g_gamma = s * P;
  const double sum_h = a_gamma * db - gs_m * (db * AX + dg * A);
  const double sum_hx = a_gamma * dg - 2.0 * gs_m * dg * AX;
  // g_x_j = s (H_j - sum_h / M - xhat_j sum_hx / M) - gamma P s^2 xhat_j / M, where
  // H_j = -gs_m dg a_j everywhere plus (a_gamma - gs_m AX) dz_j at the routed elements.
  const double cx = -s * sum_hx / count - gamma * P * s * s / count;  // times xhat_j
  const double c0 = -s * sum_h / count;
  const double ca = -s * gs_m * dg;  // times a_j
  const double cz = s * (a_gamma - gs_m * AX);  // times dz_j
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * img_stride;
    T* gxi = g_x + i * img_stride;
    const T* ai = a != nullptr ? a + i * img_stride : nullptr;
    for (int64_t p = 0; p < hw; ++p) {
      const double xh = (static_cast<double>(xi[p]) - mean) * s;
      gxi[p] = static_cast<T>(cx * xh + c0 + (ai != nullptr ? ca * static_cast<double>(ai[p]) : 0.0));
    }
    for (int64_t rr = 0; rr < ho; ++rr)
      for (int64_t j = 0; j < wo; ++j) {
        const int64_t o = i * out_img_stride + rr * wo + j;
        const int kk = idx[o];
        const double r = rate(kk);
        if (r == 0.0) {
          g_grad_out[o] = T(0);
          continue;
        }
        const int64_t p = routed_pos(rr, j, kk);
        const double xh = (static_cast<double>(xi[p]) - mean) * s;
        const double av = ai != nullptr ? static_cast<double>(ai[p]) : 0.0;
        gxi[p] = static_cast<T>(static_cast<double>(gxi[p]) + cz * r * static_cast<double>(grad_out[o]));
        g_grad_out[o] = static_cast<T>(r * (gamma * s * (av - A / count - xh * AX / count) + a_gamma * xh + a_beta));
      }
  }
}

}  // namespace fastmeta::cpu::vec::FASTMETA_VEC_NS
