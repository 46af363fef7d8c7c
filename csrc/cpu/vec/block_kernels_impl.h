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

#include "block_kernels.h"

namespace fastmeta::cpu::vec::FASTMETA_VEC_NS {

// 32 independent lanes (as in sumsq_t): one vector accumulator would wait on the add latency.
constexpr int kPlaneLanes = 32;

// One plane's shifted sums: s1 += sum (x - shift), s2 += sum (x - shift)^2, in one pass (lanes in T,
// totals in double). With the shift near the mean (the caller uses one element of the channel) the
// variance (s2 - s1^2 / M) / M does not cancel catastrophically.
template <typename T>
void stats_t(const T* __restrict x, int64_t n, T shift, double* s1, double* s2) {
  T a1[kPlaneLanes] = {}, a2[kPlaneLanes] = {};
  int64_t i = 0;
  for (; i + kPlaneLanes <= n; i += kPlaneLanes) {
#pragma omp simd
    for (int j = 0; j < kPlaneLanes; ++j) {
      const T d = x[i + j] - shift;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    const T d = x[i] - shift;
    a1[0] += d;
    a2[0] += d * d;
  }
  double t1 = 0.0, t2 = 0.0;
  for (int j = 0; j < kPlaneLanes; ++j) {
    t1 += static_cast<double>(a1[j]);
    t2 += static_cast<double>(a2[j]);
  }
  *s1 += t1;
  *s2 += t2;
}

// One vector register of lanes (GCC vector extensions): 8 float / 4 double in the avx2 build, 4 / 2
// in the baseline (SSE2) one, where 32-byte vectors were lowered to scalar shuffles (8x slower). A
// pooling row of Conv-4 is 14 windows wide, too short for the auto-vectorizer, which left these
// loops scalar and branchy (measured 4-5x slower than this).
template <typename T, int L>
struct Lanes;
template <>
struct Lanes<float, 8> {
  static constexpr int L = 8;
  typedef float v __attribute__((vector_size(32)));
  typedef int32_t m __attribute__((vector_size(32)));
  typedef uint8_t b __attribute__((vector_size(8)));
  static v evens(v a, v c) { return __builtin_shufflevector(a, c, 0, 2, 4, 6, 8, 10, 12, 14); }
  static v odds(v a, v c) { return __builtin_shufflevector(a, c, 1, 3, 5, 7, 9, 11, 13, 15); }
  static v zip_lo(v e, v o) { return __builtin_shufflevector(e, o, 0, 8, 1, 9, 2, 10, 3, 11); }
  static v zip_hi(v e, v o) { return __builtin_shufflevector(e, o, 4, 12, 5, 13, 6, 14, 7, 15); }
  static m iota() { return m{0, 1, 2, 3, 4, 5, 6, 7}; }
};
template <>
struct Lanes<float, 4> {
  static constexpr int L = 4;
  typedef float v __attribute__((vector_size(16)));
  typedef int32_t m __attribute__((vector_size(16)));
  typedef uint8_t b __attribute__((vector_size(4)));
  static v evens(v a, v c) { return __builtin_shufflevector(a, c, 0, 2, 4, 6); }
  static v odds(v a, v c) { return __builtin_shufflevector(a, c, 1, 3, 5, 7); }
  static v zip_lo(v e, v o) { return __builtin_shufflevector(e, o, 0, 4, 1, 5); }
  static v zip_hi(v e, v o) { return __builtin_shufflevector(e, o, 2, 6, 3, 7); }
  static m iota() { return m{0, 1, 2, 3}; }
};
template <>
struct Lanes<double, 4> {
  static constexpr int L = 4;
  typedef double v __attribute__((vector_size(32)));
  typedef int64_t m __attribute__((vector_size(32)));
  typedef uint8_t b __attribute__((vector_size(4)));
  static v evens(v a, v c) { return __builtin_shufflevector(a, c, 0, 2, 4, 6); }
  static v odds(v a, v c) { return __builtin_shufflevector(a, c, 1, 3, 5, 7); }
  static v zip_lo(v e, v o) { return __builtin_shufflevector(e, o, 0, 4, 1, 5); }
  static v zip_hi(v e, v o) { return __builtin_shufflevector(e, o, 2, 6, 3, 7); }
  static m iota() { return m{0, 1, 2, 3}; }
};
template <>
struct Lanes<double, 2> {
  static constexpr int L = 2;
  typedef double v __attribute__((vector_size(16)));
  typedef int64_t m __attribute__((vector_size(16)));
  typedef uint8_t b __attribute__((vector_size(2)));
  static v evens(v a, v c) { return __builtin_shufflevector(a, c, 0, 2); }
  static v odds(v a, v c) { return __builtin_shufflevector(a, c, 1, 3); }
  static v zip_lo(v e, v o) { return __builtin_shufflevector(e, o, 0, 2); }
  static v zip_hi(v e, v o) { return __builtin_shufflevector(e, o, 1, 3); }
  static m iota() { return m{0, 1}; }
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

// Row kernels over one output row of windows j in [0, wo) and its two input rows r0, r1, with Ln's
// lanes; a row of at least L windows ends with a group overlapping the previous one (lanes already
// done are recomputed identically in the forward and masked out in the backward), so there is no
// scalar tail. Rows narrower than the narrowest register go through the *_scalar versions.

// Forward: z = x * scale + shift; max_pool2d's rule (the first maximum in row-major order wins ties:
// a right or lower element only when strictly greater), then relu (index 4: the maximum is <= 0,
// so no element of the window gets gradient).
template <typename Ln, typename T>
inline void row_fwd(const T* r0, const T* r1, int64_t wo, T scale, T shift, T* o, uint8_t* k) {
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  for (int64_t gs = 0; gs < wo; gs += L) {
    const int64_t j = std::min(gs, wo - L);
    const V a0 = load_v<V>(r0 + 2 * j), a1 = load_v<V>(r0 + 2 * j + L);
    const V c0 = load_v<V>(r1 + 2 * j), c1 = load_v<V>(r1 + 2 * j + L);
    const V za = Ln::evens(a0, a1) * scale + shift, zb = Ln::odds(a0, a1) * scale + shift;
    const V zc = Ln::evens(c0, c1) * scale + shift, zd = Ln::odds(c0, c1) * scale + shift;
    const M right = zb > za, right_low = zd > zc;
    const V t = right ? zb : za, u = right_low ? zd : zc;
    const M kt = right & 1, ku = (right_low & 1) + 2;
    const M down = u > t;
    V best = down ? u : t;
    M kk = down ? ku : kt;
    const M pos = best > T(0);
    best = pos ? best : V{};
    kk = pos ? kk : M{} + 4;
    store_v(o + j, best);
    store_v(k + j, __builtin_convertvector(kk, typename Ln::b));
  }
}

// Rows narrower than one register. Written without data-dependent branches (about half the
// windows are all <= 0, which makes a branch a coin flip): selects and 0/1 weights only.
template <typename T>
inline void row_fwd_scalar(const T* r0, const T* r1, int64_t wo, T scale, T shift, T* o, uint8_t* k) {
  for (int64_t j = 0; j < wo; ++j) {
    const T a = r0[2 * j] * scale + shift, b = r0[2 * j + 1] * scale + shift;
    const T c = r1[2 * j] * scale + shift, d = r1[2 * j + 1] * scale + shift;
    const int right = b > a, right_low = d > c;
    const T t = right ? b : a, u = right_low ? d : c;
    const int down = u > t;
    const T best = down ? u : t;
    const int kk = down ? 2 + right_low : right;
    const int pos = best > T(0);
    o[j] = pos ? best : T(0);
    k[j] = static_cast<uint8_t>(pos ? kk : 4);
  }
}

// Backward, pass 1: adds sum dz and sum dz * (x - mean) over the row's routed elements (one per
// window at most; the routed x is selected from the window's four elements) to sg, sgx.
template <typename Ln, typename T>
inline void row_sums(const T* r0, const T* r1, const T* g, const uint8_t* k, int64_t wo, T mean, T& sg, T& sgx) {
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  V vg{}, vgx{};
  for (int64_t gs = 0; gs < wo; gs += L) {
    const int64_t j = std::min(gs, wo - L);
    const M kk = (Ln::iota() >= static_cast<int32_t>(gs - j)) ? load_idx<Ln>(k + j) : M{} + 4;
    const V a0 = load_v<V>(r0 + 2 * j), a1 = load_v<V>(r0 + 2 * j + L);
    const V c0 = load_v<V>(r1 + 2 * j), c1 = load_v<V>(r1 + 2 * j + L);
    const V top = (kk & 1) ? Ln::odds(a0, a1) : Ln::evens(a0, a1);
    const V bot = (kk & 1) ? Ln::odds(c0, c1) : Ln::evens(c0, c1);
    const V xs = (kk & 2) ? bot : top;
    const V routed = kk < 4 ? load_v<V>(g + j) : V{};
    vg += routed;
    vgx += routed * (xs - mean);
  }
  for (int l = 0; l < L; ++l) {
    sg += vg[l];
    sgx += vgx[l];
  }
}

template <typename T>
inline void row_sums_scalar(const T* r0, const T* r1, const T* g, const uint8_t* k, int64_t wo, T mean, T& sg,
                            T& sgx) {
  for (int64_t j = 0; j < wo; ++j) {
    const int kk = k[j];
    const T xs = kk < 4 ? ((kk & 2) ? r1 : r0)[2 * j + (kk & 1)] : T(0);
    const T routed = kk < 4 ? g[j] : T(0);
    sg += routed;
    sgx += routed * (xs - mean);
  }
}

// Backward, pass 2, for the two input rows of one output row: dx = c1 * (x - mean) + c0 + kg * dz
// (dz = the window's gradient at its routed element, 0 elsewhere), written once per element (a
// dense pass followed by a scatter-add would write the row twice).
template <typename Ln, typename T>
inline void row_dx(const T* x0, const T* x1, T* d0, T* d1, const T* g, const uint8_t* k, int64_t wo, T mean, T c1,
                   T c0, T kg) {
  using V = typename Ln::v;
  using M = typename Ln::m;
  constexpr int L = Ln::L;
  for (int64_t gs = 0; gs < wo; gs += L) {
    const int64_t j = std::min(gs, wo - L);  // the overlap recomputes identical values
    const M kk = load_idx<Ln>(k + j);
    const V gk = load_v<V>(g + j) * kg;
    const V e0 = kk == 0 ? gk : V{}, e1 = kk == 1 ? gk : V{};
    const V e2 = kk == 2 ? gk : V{}, e3 = kk == 3 ? gk : V{};
    store_v(d0 + 2 * j, (load_v<V>(x0 + 2 * j) - mean) * c1 + c0 + Ln::zip_lo(e0, e1));
    store_v(d0 + 2 * j + L, (load_v<V>(x0 + 2 * j + L) - mean) * c1 + c0 + Ln::zip_hi(e0, e1));
    store_v(d1 + 2 * j, (load_v<V>(x1 + 2 * j) - mean) * c1 + c0 + Ln::zip_lo(e2, e3));
    store_v(d1 + 2 * j + L, (load_v<V>(x1 + 2 * j + L) - mean) * c1 + c0 + Ln::zip_hi(e2, e3));
  }
}

template <typename T>
inline void row_dx_scalar(const T* x0, const T* x1, T* d0, T* d1, const T* g, const uint8_t* k, int64_t wo, T mean,
                          T c1, T c0, T kg) {
  for (int64_t j = 0; j < wo; ++j) {
    const int kk = k[j];
    const T gk = kg * g[j];
    d0[2 * j] = (x0[2 * j] - mean) * c1 + c0 + (kk == 0 ? gk : T(0));
    d0[2 * j + 1] = (x0[2 * j + 1] - mean) * c1 + c0 + (kk == 1 ? gk : T(0));
    d1[2 * j] = (x1[2 * j] - mean) * c1 + c0 + (kk == 2 ? gk : T(0));
    d1[2 * j + 1] = (x1[2 * j + 1] - mean) * c1 + c0 + (kk == 3 ? gk : T(0));
  }
}

// Forward of one H x W plane: the pooled plane and its window indices (see block_kernels.h).
template <typename T>
void fwd_plane_t(const T* x, int64_t h, int64_t w, T scale, T shift, T* out, uint8_t* idx) {
  const int64_t ho = h / 2, wo = w / 2;
  // A NaN or infinity anywhere in the channel makes its statistics, and so every output of the
  // channel, NaN in ATen's batch norm: the same here, without NaN tests in the window loops.
  if (!std::isfinite(scale) || !std::isfinite(shift)) {
    for (int64_t p = 0; p < ho * wo; ++p) {
      out[p] = std::numeric_limits<T>::quiet_NaN();
      idx[p] = 4;
    }
    return;
  }
  for (int64_t rr = 0; rr < ho; ++rr) {
    const T* r0 = x + 2 * rr * w;
    if (wo >= Wide<T>::L)
      row_fwd<Wide<T>>(r0, r0 + w, wo, scale, shift, out + rr * wo, idx + rr * wo);
    else if (wo >= Narrow<T>::L)
      row_fwd<Narrow<T>>(r0, r0 + w, wo, scale, shift, out + rr * wo, idx + rr * wo);
    else
      row_fwd_scalar(r0, r0 + w, wo, scale, shift, out + rr * wo, idx + rr * wo);
  }
}

// Backward, pass 1, one plane: adds sum dz and sum dz * (x - mean) (dz: the routed gradient; per
// plane in T, into double totals). Branch-free over the windows in the vector rows: about half of
// them route nothing (maximum <= 0), so a branch on the index mispredicts half the time.
template <typename T>
void bwd_sums_t(const T* x, int64_t h, int64_t w, const T* grad_out, const uint8_t* idx, T mean, double* sdz,
                double* sdzx) {
  const int64_t ho = h / 2, wo = w / 2;
  T sg = 0, sgx = 0;
  for (int64_t rr = 0; rr < ho; ++rr) {
    const T* r0 = x + 2 * rr * w;
    const T* g = grad_out + rr * wo;
    const uint8_t* k = idx + rr * wo;
    if (wo >= Wide<T>::L)
      row_sums<Wide<T>>(r0, r0 + w, g, k, wo, mean, sg, sgx);
    else if (wo >= Narrow<T>::L)
      row_sums<Narrow<T>>(r0, r0 + w, g, k, wo, mean, sg, sgx);
    else
      row_sums_scalar(r0, r0 + w, g, k, wo, mean, sg, sgx);
  }
  *sdz += static_cast<double>(sg);
  *sdzx += static_cast<double>(sgx);
}

// Backward, pass 2, one plane: dx = c1 * (x - mean) + c0 + kg * dz, each element written once.
template <typename T>
void dx_plane_t(const T* x, int64_t h, int64_t w, const T* grad_out, const uint8_t* idx, T mean, T c1, T c0, T kg,
                T* dx) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t rr = 0; rr < ho; ++rr) {
    const T* x0 = x + 2 * rr * w;
    T* d0 = dx + 2 * rr * w;
    const T* g = grad_out + rr * wo;
    const uint8_t* k = idx + rr * wo;
    if (wo >= Wide<T>::L)
      row_dx<Wide<T>>(x0, x0 + w, d0, d0 + w, g, k, wo, mean, c1, c0, kg);
    else if (wo >= Narrow<T>::L)
      row_dx<Narrow<T>>(x0, x0 + w, d0, d0 + w, g, k, wo, mean, c1, c0, kg);
    else
      row_dx_scalar(x0, x0 + w, d0, d0 + w, g, k, wo, mean, c1, c0, kg);
    if (w % 2 == 1) {  // the last column is in no window: its dz is 0
      d0[w - 1] = (x0[w - 1] - mean) * c1 + c0;
      d0[2 * w - 1] = (x0[2 * w - 1] - mean) * c1 + c0;
    }
  }
  for (int64_t p = 2 * ho * w; p < h * w; ++p) dx[p] = (x[p] - mean) * c1 + c0;  // odd h: the last row
}

// Double backward (second-order MAML differentiates the inner gradient, i.e. bwd). Per channel,
// with M elements, s = invstd, xhat = (x - mean) s, dz the routed gradient, db = sum dz,
// dg = sum dz xhat, and bwd's dx = gamma s (dz - db / M - xhat dg / M): for
// L = sum a dx + a_gamma dg + a_beta db, with A = sum a, AX = sum a xhat, ADZ = sum a dz,
//   dL/d dz_j  = gamma s (a_j - A / M - xhat_j AX / M) + a_gamma xhat_j + a_beta
//   dL/d gamma = s P,  P = ADZ - db A / M - dg AX / M
//   dL/d x_j   = s (H_j - sum(H) / M - xhat_j sum(H xhat) / M) - gamma P s^2 xhat_j / M,
//     H_k = a_gamma dz_k - (gamma s / M)(dz_k AX + dg a_k)      (dL/d xhat_k at fixed s),
//     sum(H) = a_gamma db - (gamma s / M)(db AX + dg A),  sum(H xhat) = a_gamma dg - 2 (gamma s / M) dg AX,
// using d xhat_k / d x_j = s (delta_kj - 1 / M - xhat_k xhat_j / M). Only the create_graph path
// (MAML's support set, a few images per task) runs this, so it is plain scalar code in double.
template <typename T>
void block_bwd2_t(const T* a, double a_gamma, double a_beta, const T* grad_out, const uint8_t* idx,
                  int64_t out_img_stride, const T* x, int64_t n, int64_t img_stride, int64_t h, int64_t w, T gamma_t,
                  double mean, double invstd, T* g_grad_out, T* g_x, double* g_gamma) {
  const int64_t hw = h * w, ho = h / 2, wo = w / 2;
  const double count = static_cast<double>(n * hw), s = invstd, gamma = static_cast<double>(gamma_t);
  auto routed_pos = [&](int64_t rr, int64_t j, int kk) { return (2 * rr + (kk >> 1)) * w + 2 * j + (kk & 1); };
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
        if (kk >= 4) continue;
        const int64_t p = routed_pos(rr, j, kk);
        const double gv = static_cast<double>(grad_out[i * out_img_stride + rr * wo + j]);
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
        if (kk >= 4) {
          g_grad_out[o] = T(0);
          continue;
        }
        const int64_t p = routed_pos(rr, j, kk);
        const double xh = (static_cast<double>(xi[p]) - mean) * s;
        const double av = ai != nullptr ? static_cast<double>(ai[p]) : 0.0;
        gxi[p] = static_cast<T>(static_cast<double>(gxi[p]) + cz * static_cast<double>(grad_out[o]));
        g_grad_out[o] = static_cast<T>(gamma * s * (av - A / count - xh * AX / count) + a_gamma * xh + a_beta);
      }
  }
}

inline void widen_bf16_t(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}

inline void narrow_bf16_t(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}

}  // namespace fastmeta::cpu::vec::FASTMETA_VEC_NS
