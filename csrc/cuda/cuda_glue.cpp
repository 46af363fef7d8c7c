// Torch glue for the CUDA kernels: TORCH_LIBRARY_IMPL(fastmeta, CUDA) for every op schema defined in
// csrc/registration.cpp. Only device-generic c10/ATen APIs are used (DeviceGuard, the device guard
// implementation's current stream, at::empty), so this file compiles against a CPU-only torch wheel;
// the .cu files are torch-free. Built as a separate library (fastmeta/_C_cuda*.so) so that a missing
// CUDA runtime never takes the CPU kernels down. Compiled and registered here; never run on a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"

namespace fastmeta::cuda {

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(s.native_handle());
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastmeta::", op, " CUDA launch failed: ", cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastmeta: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastmeta: ", name,
              " must be float32 or float64");
}

at::Tensor workspace(const at::Tensor& like, int64_t rows, int64_t d) {
  return at::empty({reduction_workspace(rows, d)}, like.options().dtype(at::kDouble));
}

at::Tensor row_norm_cuda(const at::Tensor& g_in) {
  check_cuda(g_in, "g");
  TORCH_CHECK(g_in.dim() == 2, "fastmeta::row_norm: g must be [T, D]");
  c10::DeviceGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous();
  const int64_t rows = g.size(0), d = g.size(1);
  at::Tensor out = at::empty({rows}, g.options());
  at::Tensor ws = workspace(g, rows, d);
  if (g.scalar_type() == at::kFloat) {
    check(launch_row_norm<float>(g.const_data_ptr<float>(), out.mutable_data_ptr<float>(), rows, d,
                                 ws.mutable_data_ptr<double>(), current_stream(g)), "row_norm");
  } else {
    check(launch_row_norm<double>(g.const_data_ptr<double>(), out.mutable_data_ptr<double>(), rows, d,
                                  ws.mutable_data_ptr<double>(), current_stream(g)), "row_norm");
  }
  return out;
}

template <typename T>
void sam_perturb_typed(const at::Tensor& theta, const at::Tensor& g, const at::Tensor& mask, const at::Tensor& radius,
                       at::Tensor& out, double eps, bool global_norm, at::Tensor& ws) {
  const int64_t rows = g.size(0), d = g.size(1);
  check(launch_sam_perturb<T>(theta.const_data_ptr<T>(), theta.dim() == 1 ? 0 : d, g.const_data_ptr<T>(),
                              mask.defined() ? mask.const_data_ptr<T>() : nullptr, radius.const_data_ptr<T>(),
                              out.mutable_data_ptr<T>(), rows, d, eps, global_norm, ws.mutable_data_ptr<double>(),
                              current_stream(g)),
        "sam_perturb");
}

at::Tensor sam_perturb_cuda(const at::Tensor& theta_in, const at::Tensor& g_in, const at::Tensor& radius_in,
                            const std::optional<at::Tensor>& mask_in, double eps, bool global_norm) {
  check_cuda(theta_in, "theta");
  check_cuda(g_in, "g");
  TORCH_CHECK(g_in.dim() == 2, "fastmeta::sam_perturb: g must be [T, D]");
  c10::DeviceGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous(), theta = theta_in.contiguous();
  const at::Tensor radius = radius_in.to(g.options()).contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->to(g.options()).contiguous();
  const int64_t rows = g.size(0), d = g.size(1);
  TORCH_CHECK(radius.numel() == rows, "fastmeta::sam_perturb: radius must have T elements");
  at::Tensor out = at::empty({rows, d}, g.options());
  at::Tensor ws = workspace(g, rows, d);
  if (g.scalar_type() == at::kFloat) {
    sam_perturb_typed<float>(theta, g, mask, radius, out, eps, global_norm, ws);
  } else {
    sam_perturb_typed<double>(theta, g, mask, radius, out, eps, global_norm, ws);
  }
  return out;
}

at::Tensor fd_hvp_points_cuda(const at::Tensor& theta_in, const at::Tensor& v_in, const at::Tensor& delta_in) {
  check_cuda(theta_in, "theta");
  check_cuda(v_in, "v");
  c10::DeviceGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous(), theta = theta_in.contiguous();
  const at::Tensor delta = delta_in.to(v.options()).contiguous();
  const int64_t rows = v.size(0), d = v.size(1);
  at::Tensor out = at::empty({2 * rows, d}, v.options());
  const int64_t ts = theta.dim() == 1 ? 0 : d;
  if (v.scalar_type() == at::kFloat) {
    check(launch_fd_hvp_points<float>(theta.const_data_ptr<float>(), ts, v.const_data_ptr<float>(),
                                      delta.const_data_ptr<float>(), out.mutable_data_ptr<float>(), rows, d,
                                      current_stream(v)), "fd_hvp_points");
  } else {
    check(launch_fd_hvp_points<double>(theta.const_data_ptr<double>(), ts, v.const_data_ptr<double>(),
                                       delta.const_data_ptr<double>(), out.mutable_data_ptr<double>(), rows, d,
                                       current_stream(v)), "fd_hvp_points");
  }
  return out;
}

at::Tensor fd_hvp_combine_cuda(const at::Tensor& go_in, const at::Tensor& gp_in, const at::Tensor& gm_in,
                               const at::Tensor& delta_in, double inner_lr, bool mean) {
  check_cuda(go_in, "g_o");
  c10::DeviceGuard guard(go_in.device());
  const at::Tensor go = go_in.contiguous(), gp = gp_in.contiguous(), gm = gm_in.contiguous();
  const at::Tensor delta = delta_in.to(go.options()).contiguous();
  const int64_t rows = go.size(0), d = go.size(1);
  at::Tensor out = mean ? at::empty({d}, go.options()) : at::empty({rows, d}, go.options());
  if (go.scalar_type() == at::kFloat) {
    check(launch_fd_hvp_combine<float>(go.const_data_ptr<float>(), gp.const_data_ptr<float>(),
                                       gm.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                                       out.mutable_data_ptr<float>(), rows, d, inner_lr, mean, current_stream(go)),
          "fd_hvp_combine");
  } else {
    check(launch_fd_hvp_combine<double>(go.const_data_ptr<double>(), gp.const_data_ptr<double>(),
                                        gm.const_data_ptr<double>(), delta.const_data_ptr<double>(),
                                        out.mutable_data_ptr<double>(), rows, d, inner_lr, mean, current_stream(go)),
          "fd_hvp_combine");
  }
  return out;
}

void swp_mask_cuda(at::Tensor& out, double keep_prob, int64_t seed, bool rescale) {
  check_cuda(out, "out");
  TORCH_CHECK(out.is_contiguous(), "fastmeta::swp_mask: out must be contiguous");
  c10::DeviceGuard guard(out.device());
  if (out.scalar_type() == at::kFloat) {
    check(launch_swp_mask<float>(out.mutable_data_ptr<float>(), out.numel(), keep_prob, seed, rescale,
                                 current_stream(out)), "swp_mask");
  } else {
    check(launch_swp_mask<double>(out.mutable_data_ptr<double>(), out.numel(), keep_prob, seed, rescale,
                                  current_stream(out)), "swp_mask");
  }
}

at::Tensor sds_select_cuda(const at::Tensor& clean_in, const at::Tensor& pert_in, int64_t k) {
  check_cuda(clean_in, "loss_clean");
  c10::DeviceGuard guard(clean_in.device());
  const at::Tensor clean = clean_in.contiguous(), pert = pert_in.contiguous();
  const int64_t rows = clean.size(0), n = clean.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "fastmeta::sds_select: k must be in [1, N]");
  at::Tensor out = at::empty({rows, k}, clean.options().dtype(at::kLong));
  if (clean.scalar_type() == at::kFloat) {
    check(launch_sds_select<float>(clean.const_data_ptr<float>(), pert.const_data_ptr<float>(),
                                   out.mutable_data_ptr<int64_t>(), rows, n, k, current_stream(clean)), "sds_select");
  } else {
    check(launch_sds_select<double>(clean.const_data_ptr<double>(), pert.const_data_ptr<double>(),
                                    out.mutable_data_ptr<int64_t>(), rows, n, k, current_stream(clean)), "sds_select");
  }
  return out;
}

}  // namespace

}  // namespace fastmeta::cuda

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("row_norm", &fastmeta::cuda::row_norm_cuda);
  m.impl("sam_perturb", &fastmeta::cuda::sam_perturb_cuda);
  m.impl("fd_hvp_points", &fastmeta::cuda::fd_hvp_points_cuda);
  m.impl("fd_hvp_combine", &fastmeta::cuda::fd_hvp_combine_cuda);
  m.impl("swp_mask", &fastmeta::cuda::swp_mask_cuda);
  m.impl("sds_select", &fastmeta::cuda::sds_select_cuda);
}
