// fastmeta::row_norm, CPU: out[t] = sqrt(sum_d g[t, d]^2) for a [T, D] matrix.
// One read of g. Many rows: one row per work item; few long rows (T below 4x the thread count):
// two-stage reduction over (row, 8192-element block) partial sums so every core has work.
#include <ATen/ops/empty.h>

#include "common.h"

namespace fastmeta::cpu {

at::Tensor row_norm_cpu(const at::Tensor& g_in) {
  check_float(g_in, "g");
  TORCH_CHECK(g_in.dim() == 2, "fastmeta::row_norm: g must be [T, D], got ", g_in.sizes());
  const at::Tensor g = g_in.contiguous();
  const int64_t rows = g.size(0), d = g.size(1);
  at::Tensor out = at::empty({rows}, g.options());
  std::vector<double> ss(rows);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "row_norm_cpu", [&] {
    row_sumsq<scalar_t>(g.const_data_ptr<scalar_t>(), nullptr, rows, d, ss.data());
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) o[r] = static_cast<scalar_t>(std::sqrt(ss[r]));
  });
  return out;
}

}  // namespace fastmeta::cpu
