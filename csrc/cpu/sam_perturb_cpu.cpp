// fastmeta::sam_perturb, CPU (Sharp-MAML eqs. 11 and 13, SAM eq. 8a):
//   out[t, :] = theta[t or broadcast, :] + radius[t] * (g*m)[t, :] / max(||(g*m)[t, :]||, eps)
// and with global_norm the norm is taken over all T*D elements instead of per row.
// Passes: the norm must be known before any output is written, so g (and mask) are read twice.
// With many rows each work item is one whole row: norm, then the axpy, while the row (448 KB at
// D=112k float32) is still in L2, so DRAM sees one read of g. With few long rows (or global_norm)
// a two-stage reduction gives every core work, then an elementwise pass over (row, block) items.
#include <ATen/ops/empty.h>

#include "common.h"

namespace fastmeta::cpu {

namespace {

inline double safe_scale(double radius, double sumsq, double eps) {
  // max(norm, eps) with eps > 0 keeps a zero row at zero perturbation (0 * finite), never NaN; a NaN
  // norm stays NaN (std::max returns its first argument when they do not compare), as the reference.
  return radius / std::max(std::sqrt(sumsq), eps);
}

}  // namespace

at::Tensor sam_perturb_cpu(const at::Tensor& theta_in, const at::Tensor& g_in,
                           const at::Tensor& radius, const std::optional<at::Tensor>& mask_in,
                           double eps, bool global_norm) {
  check_float(theta_in, "theta");
  check_float(g_in, "g");
  TORCH_CHECK(g_in.dim() == 2, "fastmeta::sam_perturb: g must be [T, D], got ", g_in.sizes());
  TORCH_CHECK(theta_in.scalar_type() == g_in.scalar_type(), "fastmeta::sam_perturb: theta must have g's dtype ",
              g_in.scalar_type(), ", got ", theta_in.scalar_type());
  const int64_t rows = g_in.size(0), d = g_in.size(1);
  TORCH_CHECK(theta_in.dim() == 1 ? theta_in.size(0) == d
                                  : (theta_in.dim() == 2 && theta_in.size(0) == rows && theta_in.size(1) == d),
              "fastmeta::sam_perturb: theta must be [D] or [T, D]");
  TORCH_CHECK(radius.numel() == rows, "fastmeta::sam_perturb: radius must have T = ", rows, " elements, got ",
              radius.numel());
  const at::Tensor g = g_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->sizes() == g_in.sizes(), "fastmeta::sam_perturb: mask must have g's shape ", g_in.sizes(),
                ", got ", mask_in->sizes());
    TORCH_CHECK(mask_in->device().is_cpu(), "fastmeta::sam_perturb: mask must be a CPU tensor");
    mask = mask_in->to(g.scalar_type()).contiguous();
  }
  const std::vector<double> rad = to_doubles(radius, "radius");
  const int64_t theta_stride = theta.dim() == 1 ? 0 : d;
  at::Tensor out = at::empty({rows, d}, g.options());

  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sam_perturb_cpu", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    const T* mp = mask.defined() ? mask.const_data_ptr<T>() : nullptr;
    const T* tp = theta.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    const auto& k = vec::kernels<T>();
    const bool stream = static_cast<int64_t>(rows * d * sizeof(T)) >= vec::stream_threshold_bytes();
    const bool fused_rows = !global_norm && (num_blocks(d) <= 1 || rows >= 4 * at::get_num_threads());
    if (fused_rows) {
      const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(d, 1));
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* gr = gp + r * d;
          const T* mr = mp ? mp + r * d : nullptr;
          const T scale = static_cast<T>(safe_scale(rad[r], sumsq(gr, mr, d), eps));
          k.axpy(tp + r * theta_stride, gr, mr, op + r * d, scale, d, stream);
        }
      });
      return;
    }
    std::vector<double> ss(rows);
    row_sumsq<T>(gp, mp, rows, d, ss.data());
    std::vector<T> scale(rows);
    if (global_norm) {
      double total = 0.0;
      for (double s : ss) total += s;
      for (int64_t r = 0; r < rows; ++r) scale[r] = static_cast<T>(safe_scale(rad[r], total, eps));
    } else {
      for (int64_t r = 0; r < rows; ++r) scale[r] = static_cast<T>(safe_scale(rad[r], ss[r], eps));
    }
    for_row_blocks(rows, d, [&](int64_t r, int64_t b, int64_t e) {
      k.axpy(tp + r * theta_stride + b, gp + r * d + b, mp ? mp + r * d + b : nullptr, op + r * d + b,
             scale[r], e - b, stream);
    });
  });
  return out;
}

}  // namespace fastmeta::cpu
