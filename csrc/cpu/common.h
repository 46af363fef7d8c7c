// Shared helpers for the C++ CPU kernels: row/column-block partitioning over at::parallel_for,
// float sums of squares with double block totals, argument checks.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../cuda/swp_mask_keep.h"
#include "vec/row_kernels.h"

namespace fastmeta::cpu {

// Elements per work item when a row is split: 8192 floats = 32 KB, about one L1d, so a block that
// one pass reads is still in L1/L2 for the next pass.
constexpr int64_t kBlock = 8192;
// Below this many elements a kernel runs on one thread (thread wake-up costs more than the work).
constexpr int64_t kSerialElements = 32768;

inline int64_t num_blocks(int64_t d) { return d == 0 ? 0 : (d + kBlock - 1) / kBlock; }

// Sum of squares of x[i] (times m[i] when m is not null) over [0, n): the ISA-dispatched kernel of
// vec/row_kernels.h (32 float lanes per 8192-element block, block totals in double, which keeps the
// float32 error at the level of a pairwise sum, like torch's own cascade sums).
template <typename T>
inline double sumsq(const T* __restrict x, const T* __restrict m, int64_t n) {
  return vec::kernels<T>().sumsq(x, m, n);
}

// Per-row sums of squares of a contiguous [rows, d] matrix (optionally masked), into out[rows].
// Many rows: one row per work item (the row stays in cache for a following pass by the caller).
// Few long rows: a two-stage reduction, (row, block) partial sums in parallel, then per-row totals.
template <typename T>
inline void row_sumsq(const T* x, const T* m, int64_t rows, int64_t d, double* out) {
  const int64_t nb = num_blocks(d);
  if (rows == 0) return;
  if (nb <= 1 || rows >= 4 * at::get_num_threads()) {
    const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(d, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) out[r] = sumsq(x + r * d, m ? m + r * d : nullptr, d);
    });
    return;
  }
  std::vector<double> partial(rows * nb);
  at::parallel_for(0, rows * nb, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t r = w / nb, b = (w % nb) * kBlock;
      const int64_t n = std::min(kBlock, d - b);
      partial[w] = sumsq(x + r * d + b, m ? m + r * d + b : nullptr, n);
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t b = 0; b < nb; ++b) s += partial[r * nb + b];
    out[r] = s;
  }
}

// Runs fn(row, begin, end) over every (row, column block) of a [rows, d] matrix in parallel.
template <typename F>
inline void for_row_blocks(int64_t rows, int64_t d, const F& fn) {
  const int64_t nb = num_blocks(d);
  const int64_t items = rows * nb;
  if (items == 0) return;
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::min(kBlock, std::max<int64_t>(d, 1)));
  at::parallel_for(0, items, grain, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t r = w / nb, b = (w % nb) * kBlock;
      fn(r, b, std::min(d, b + kBlock));
    }
  });
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastmeta: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastmeta: ", name, " must be a CPU tensor");
}

// [T] per-row scalars (radius, delta) as doubles, whatever their floating dtype; read on the host,
// so they must be CPU tensors.
inline std::vector<double> to_doubles(const at::Tensor& t, const char* name = "radius/delta") {
  TORCH_CHECK(t.device().is_cpu(), "fastmeta: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_floating_point(), "fastmeta: ", name, " must be a floating tensor, got ", t.scalar_type());
  const at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

}  // namespace fastmeta::cpu
