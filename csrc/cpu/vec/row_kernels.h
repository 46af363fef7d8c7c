// Torch-free inner loops of the CPU kernels, compiled once per instruction set and chosen at run
// time (ATen's CPU_CAPABILITY pattern, by hand): row_kernels_default.cpp is built with the
// compiler's baseline flags (SSE2 on x86-64), row_kernels_avx2.cpp with -mavx2 -mfma; dispatch.cpp
// picks the best one the CPU supports. The kernels that call them stay one ISA-neutral unity TU, so
// a wheel built here still runs on a CPU without AVX2.
#pragma once

#include <cstdint>

namespace fastmeta::cpu::vec {

template <typename T>
struct RowKernels {
  const char* isa;
  // sum_i (x[i] * m[i])^2 over [0, n) (m may be null): float lanes within 8192-element blocks,
  // block totals in double.
  double (*sumsq)(const T* x, const T* m, int64_t n);
  // o[i] = th[i] + scale * (g[i] * m[i]) (m may be null). stream: non-temporal stores (the output
  // bypasses the caches; for outputs too large to stay in them).
  void (*axpy)(const T* th, const T* g, const T* m, T* o, T scale, int64_t n, bool stream);
  // y[i] = sum_{r < rows} (a * o[r*stride + i] + coef[r] * (p[r*stride + i] - q[r*stride + i]))
  // over [0, n): fd_hvp_combine's sum over tasks for one column chunk (rows = 0 gives zeros).
  void (*combine)(T* y, const T* o, const T* p, const T* q, int64_t stride, const T* coef, int64_t rows,
                  T a, int64_t n);
};

// The kernels of the chosen ISA (the best the CPU supports, unless overridden).
const RowKernels<float>& kernels_f32();
const RowKernels<double>& kernels_f64();
template <typename T>
inline const RowKernels<T>& kernels();
template <>
inline const RowKernels<float>& kernels<float>() { return kernels_f32(); }
template <>
inline const RowKernels<double>& kernels<double>() { return kernels_f64(); }

// "avx2" or "default": what kernels_*() return now.
const char* active_isa();
// ISAs this CPU can run, best first (always ends with "default").
const char* supported_isas();
// Test hook: force an ISA ("default", "avx2") or "" for automatic; false if unsupported here.
bool set_isa(const char* name);

// Outputs of at least this many bytes are written with non-temporal stores. Default: half the
// last-level cache one core sees (sysfs cache/index*/size of cpu0; sysconf as a fallback, which on
// AMD EPYC reports the L3 of the whole package, 12x too large), 8 MiB when unknown; the test hook
// sets it (0 = always stream).
int64_t stream_threshold_bytes();
int64_t set_stream_threshold_bytes(int64_t bytes);  // returns the previous value; < 0 = default

}  // namespace fastmeta::cpu::vec
