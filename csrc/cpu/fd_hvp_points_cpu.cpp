// fastmeta::fd_hvp_points, CPU (Fallah et al. eqs. 9 and 11):
//   out[t, :] = theta + delta[t] * v[t, :],   out[T + t, :] = theta - delta[t] * v[t, :]
// One read of v and theta per (row, block) produces both output rows: the minimum traffic.
#include <ATen/ops/empty.h>

#include "common.h"

namespace fastmeta::cpu {

at::Tensor fd_hvp_points_cpu(const at::Tensor& theta_in, const at::Tensor& v_in, const at::Tensor& delta) {
  check_float(theta_in, "theta");
  check_float(v_in, "v");
  TORCH_CHECK(v_in.dim() == 2, "fastmeta::fd_hvp_points: v must be [T, D], got ", v_in.sizes());
  TORCH_CHECK(theta_in.scalar_type() == v_in.scalar_type(), "fastmeta::fd_hvp_points: dtype mismatch");
  const int64_t rows = v_in.size(0), d = v_in.size(1);
  TORCH_CHECK(theta_in.dim() == 1 ? theta_in.size(0) == d
                                  : (theta_in.dim() == 2 && theta_in.size(0) == rows && theta_in.size(1) == d),
              "fastmeta::fd_hvp_points: theta must be [D] or [T, D]");
  TORCH_CHECK(delta.numel() == rows, "fastmeta::fd_hvp_points: delta must have T elements");
  const at::Tensor v = v_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  const std::vector<double> dl = to_doubles(delta);
  const int64_t theta_stride = theta.dim() == 1 ? 0 : d;
  at::Tensor out = at::empty({2 * rows, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fd_hvp_points_cpu", [&] {
    using T = scalar_t;
    const T* vp = v.const_data_ptr<T>();
    const T* tp = theta.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    for_row_blocks(rows, d, [&](int64_t r, int64_t b, int64_t e) {
      const T dt = static_cast<T>(dl[r]);
      const T* __restrict th = tp + r * theta_stride;
      const T* __restrict vr = vp + r * d;
      T* __restrict plus = op + r * d;
      T* __restrict minus = op + (rows + r) * d;
_Pragma("omp simd")
      for (int64_t i = b; i < e; ++i) {
        const T step = dt * vr[i];
        plus[i] = th[i] + step;
        minus[i] = th[i] - step;
      }
    });
  });
  return out;
}

}  // namespace fastmeta::cpu
