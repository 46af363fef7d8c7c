// Body of one ISA's row kernels. Included by row_kernels_<isa>.cpp with FASTMETA_VEC_NS set to
// the ISA's namespace; the compiler flags of that file decide the instruction set.
#include <algorithm>
#include <cstdint>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "row_kernels.h"

namespace fastmeta::cpu::vec::FASTMETA_VEC_NS {

// Block length for the double-precision block totals: 8192 floats = 32 KB.
constexpr int64_t kBlock = 8192;
// Independent accumulators: a single vector accumulator makes the loop wait on the add latency
// (4 cycles) every iteration; 32 float lanes are 8 SSE / 4 AVX2 registers in flight, enough to
// run at load bandwidth (measured: 3.3x faster on an L2-resident 112k-float row).
constexpr int kLanes = 32;

template <typename T>
inline double sumsq_t(const T* __restrict x, const T* __restrict m, int64_t n) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T acc[kLanes] = {};
    int64_t i = b;
    if (m != nullptr) {
      for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const T y = x[i + j] * m[i + j];
          acc[j] += y * y;
        }
      }
      for (; i < e; ++i) {
        const T y = x[i] * m[i];
        acc[0] += y * y;
      }
    } else {
      for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
      }
      for (; i < e; ++i) acc[0] += x[i] * x[i];
    }
    double s = 0.0;
    for (int j = 0; j < kLanes; ++j) s += static_cast<double>(acc[j]);
    total += s;
  }
  return total;
}

template <typename T>
inline T axpy_one(const T* th, const T* g, const T* m, T scale, int64_t i) {
  return m != nullptr ? th[i] + scale * (g[i] * m[i]) : th[i] + scale * g[i];
}

#if defined(__AVX2__) || defined(__SSE2__)
// The widest vector register this file is compiled for, per element type: the four intrinsics the
// streaming axpy needs, so one loop serves float and double on every ISA.
template <typename T>
struct Reg;
#if defined(__AVX2__)
template <>
struct Reg<float> {
  using V = __m256;
  static constexpr int64_t kBytes = 32;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
};
template <>
struct Reg<double> {
  using V = __m256d;
  static constexpr int64_t kBytes = 32;
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
};
#else
template <>
struct Reg<float> {
  using V = __m128;
  static constexpr int64_t kBytes = 16;
  static V set1(float x) { return _mm_set1_ps(x); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static V mul(V a, V b) { return _mm_mul_ps(a, b); }
  static V add(V a, V b) { return _mm_add_ps(a, b); }
  static void stream(float* p, V v) { _mm_stream_ps(p, v); }
};
template <>
struct Reg<double> {
  using V = __m128d;
  static constexpr int64_t kBytes = 16;
  static V set1(double x) { return _mm_set1_pd(x); }
  static V load(const double* p) { return _mm_loadu_pd(p); }
  static V mul(V a, V b) { return _mm_mul_pd(a, b); }
  static V add(V a, V b) { return _mm_add_pd(a, b); }
  static void stream(double* p, V v) { _mm_stream_pd(p, v); }
};
#endif
#endif

// Non-temporal stores for the aligned middle of the row; returns where the plain loop goes on.
// mul then add, never a fused multiply-add: streamed and cached rows must round identically.
template <typename T>
inline int64_t axpy_stream(const T* __restrict th, const T* __restrict g, const T* __restrict m,
                           T* __restrict o, T scale, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) || defined(__SSE2__)
  using R = Reg<T>;
  constexpr int64_t W = R::kBytes / sizeof(T);
  while (i < n && (reinterpret_cast<uintptr_t>(o + i) & (R::kBytes - 1)) != 0) {
    o[i] = axpy_one(th, g, m, scale, i);
    ++i;
  }
  const typename R::V s = R::set1(scale);
  for (; i + W <= n; i += W) {
    typename R::V gv = R::load(g + i);
    if (m != nullptr) gv = R::mul(gv, R::load(m + i));
    R::stream(o + i, R::add(R::load(th + i), R::mul(s, gv)));
  }
  _mm_sfence();  // streaming stores are weakly ordered: visible before the parallel region joins
#endif
  return i;
}

template <typename T>
inline void axpy_t(const T* __restrict th, const T* __restrict g, const T* __restrict m, T* __restrict o,
                   T scale, int64_t n, bool stream) {
  int64_t i = stream ? axpy_stream(th, g, m, o, scale, n) : 0;
  if (m != nullptr) {
#pragma omp simd
    for (int64_t k = i; k < n; ++k) o[k] = th[k] + scale * (g[k] * m[k]);
  } else {
#pragma omp simd
    for (int64_t k = i; k < n; ++k) o[k] = th[k] + scale * g[k];
  }
}

// Two task rows per pass over the output chunk: every pass reads and writes y once, so pairs halve
// that traffic. Measured at [16, 112000] float32 on 2 cores: one row per pass 202 us, pairs 124 us,
// four rows per pass 354 us (12 input streams are more than the hardware prefetchers follow).
template <typename T>
inline void combine_t(T* __restrict y, const T* o, const T* p, const T* q, int64_t stride, const T* coef,
                      int64_t rows, T a, int64_t n) {
  bool first = true;
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2, first = false) {
    const T* __restrict o0 = o + r * stride;
    const T* __restrict o1 = o0 + stride;
    const T* __restrict p0 = p + r * stride;
    const T* __restrict p1 = p0 + stride;
    const T* __restrict q0 = q + r * stride;
    const T* __restrict q1 = q0 + stride;
    const T c0 = coef[r], c1 = coef[r + 1];
    if (first) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = a * (o0[i] + o1[i]) + (c0 * (p0[i] - q0[i]) + c1 * (p1[i] - q1[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += a * (o0[i] + o1[i]) + (c0 * (p0[i] - q0[i]) + c1 * (p1[i] - q1[i]));
    }
  }
  if (r < rows) {  // an odd last row
    const T* __restrict o0 = o + r * stride;
    const T* __restrict p0 = p + r * stride;
    const T* __restrict q0 = q + r * stride;
    const T c0 = coef[r];
    if (first) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = a * o0[i] + c0 * (p0[i] - q0[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += a * o0[i] + c0 * (p0[i] - q0[i]);
    }
  } else if (first) {
    std::fill(y, y + n, T(0));  // rows == 0
  }
}

}  // namespace fastmeta::cpu::vec::FASTMETA_VEC_NS
