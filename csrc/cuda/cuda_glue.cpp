// Torch glue for the CUDA kernels: TORCH_LIBRARY_IMPL(fastmeta, CUDA) for every op schema defined in
// csrc/registration.cpp. Only device-generic c10/ATen APIs are used (DeviceGuard, the device guard
// implementation's current stream, at::empty), so this file compiles against a CPU-only torch wheel;
// the .cu files are torch-free. Built as a separate library (fastmeta/_C_cuda*.so) so that a missing
// CUDA runtime never takes the CPU kernels down. Compiled and registered here; never run on a GPU.
//
// The checks match the CPU kernels' (csrc/cpu/*.cpp) and name the argument. Shape and dtype checks
// come before device checks, so a machine without a GPU can reach them by dispatching CPU tensors to
// the CUDA kernels (tests/ops/test_cuda_glue.py); the device checks then demand that every operand is
// a CUDA tensor on the first operand's device (a kernel would otherwise read another device's memory).
//
// Also defines the fastmeta_cuda namespace: build_info() (CUDA runtime version the library was
// compiled against and nvcc's architectures) and launch_grid(kernel, rows, d) (launch_config.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "kernels.h"
#include "launch_config.h"

namespace fastmeta::cuda {

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(s.native_handle());
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastmeta::", op, " CUDA launch failed: ", cudaGetErrorString(err));
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastmeta::", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastmeta::", op, ": ", name, " must have ", ref_name,
              "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
}

void check_rows(const at::Tensor& t, int64_t rows, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == rows, "fastmeta::", op, ": ", name, " must have T = ", rows, " elements, got ", t.numel());
}

// theta is [D] (broadcast to every task) or [T, D].
void check_theta(const at::Tensor& theta, int64_t rows, int64_t d, const char* op) {
  TORCH_CHECK(theta.dim() == 1 ? theta.size(0) == d : (theta.dim() == 2 && theta.size(0) == rows && theta.size(1) == d),
              "fastmeta::", op, ": theta must be [D] or [T, D] with T = ", rows, ", D = ", d, ", got ", theta.sizes());
}

// Every operand on ref's CUDA device (checked after the shapes, see the file comment).
void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastmeta::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "fastmeta::", op, ": ", name, " is on ", t.device(), " but the data is on ",
              ref.device());
}

at::Tensor workspace(const at::Tensor& like, int64_t rows, int64_t d) {
  return at::empty({reduction_workspace(rows, d)}, like.options().dtype(at::kDouble));
}

at::Tensor row_norm_cuda(const at::Tensor& g_in) {
  check_float(g_in, "row_norm", "g");
  TORCH_CHECK(g_in.dim() == 2, "fastmeta::row_norm: g must be [T, D], got ", g_in.sizes());
  check_device(g_in, g_in, "row_norm", "g");
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
  const char* op = "sam_perturb";
  check_float(theta_in, op, "theta");
  check_float(g_in, op, "g");
  TORCH_CHECK(g_in.dim() == 2, "fastmeta::sam_perturb: g must be [T, D], got ", g_in.sizes());
  check_same_dtype(theta_in, g_in, op, "theta", "g");
  const int64_t rows = g_in.size(0), d = g_in.size(1);
  check_theta(theta_in, rows, d, op);
  TORCH_CHECK(radius_in.is_floating_point(), "fastmeta::sam_perturb: radius must be a floating tensor, got ",
              radius_in.scalar_type());
  check_rows(radius_in, rows, op, "radius");
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->sizes() == g_in.sizes(), "fastmeta::sam_perturb: mask must have g's shape ", g_in.sizes(),
                ", got ", mask_in->sizes());
  }
  check_device(g_in, g_in, op, "g");
  check_device(theta_in, g_in, op, "theta");
  check_device(radius_in, g_in, op, "radius");
  if (mask_in.has_value()) check_device(*mask_in, g_in, op, "mask");
  c10::DeviceGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous(), theta = theta_in.contiguous();
  const at::Tensor radius = radius_in.to(g.options()).contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->to(g.options()).contiguous();
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
  const char* op = "fd_hvp_points";
  check_float(theta_in, op, "theta");
  check_float(v_in, op, "v");
  TORCH_CHECK(v_in.dim() == 2, "fastmeta::fd_hvp_points: v must be [T, D], got ", v_in.sizes());
  check_same_dtype(theta_in, v_in, op, "theta", "v");
  const int64_t rows = v_in.size(0), d = v_in.size(1);
  check_theta(theta_in, rows, d, op);
  TORCH_CHECK(delta_in.is_floating_point(), "fastmeta::fd_hvp_points: delta must be a floating tensor, got ",
              delta_in.scalar_type());
  check_rows(delta_in, rows, op, "delta");
  check_device(v_in, v_in, op, "v");
  check_device(theta_in, v_in, op, "theta");
  check_device(delta_in, v_in, op, "delta");
  c10::DeviceGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous(), theta = theta_in.contiguous();
  const at::Tensor delta = delta_in.to(v.options()).contiguous();
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
  const char* op = "fd_hvp_combine";
  check_float(go_in, op, "g_o");
  check_float(gp_in, op, "g_plus");
  check_float(gm_in, op, "g_minus");
  TORCH_CHECK(go_in.dim() == 2, "fastmeta::fd_hvp_combine: g_o must be [T, D], got ", go_in.sizes());
  TORCH_CHECK(gp_in.sizes() == go_in.sizes(), "fastmeta::fd_hvp_combine: g_plus must have g_o's shape ",
              go_in.sizes(), ", got ", gp_in.sizes());
  TORCH_CHECK(gm_in.sizes() == go_in.sizes(), "fastmeta::fd_hvp_combine: g_minus must have g_o's shape ",
              go_in.sizes(), ", got ", gm_in.sizes());
  check_same_dtype(gp_in, go_in, op, "g_plus", "g_o");
  check_same_dtype(gm_in, go_in, op, "g_minus", "g_o");
  const int64_t rows = go_in.size(0), d = go_in.size(1);
  TORCH_CHECK(delta_in.is_floating_point(), "fastmeta::fd_hvp_combine: delta must be a floating tensor, got ",
              delta_in.scalar_type());
  check_rows(delta_in, rows, op, "delta");
  check_device(go_in, go_in, op, "g_o");
  check_device(gp_in, go_in, op, "g_plus");
  check_device(gm_in, go_in, op, "g_minus");
  check_device(delta_in, go_in, op, "delta");
  c10::DeviceGuard guard(go_in.device());
  const at::Tensor go = go_in.contiguous(), gp = gp_in.contiguous(), gm = gm_in.contiguous();
  const at::Tensor delta = delta_in.to(go.options()).contiguous();
  // mean over T = 0 tasks: the kernel writes NaN into every element (launch_fd_hvp_combine).
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
  check_float(out, "swp_mask", "out");
  TORCH_CHECK(out.is_contiguous(), "fastmeta::swp_mask: out must be contiguous");
  TORCH_CHECK(keep_prob > 0.0 && keep_prob <= 1.0, "fastmeta::swp_mask: keep_prob must be in (0, 1], got ",
              keep_prob);
  check_device(out, out, "swp_mask", "out");
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
  const char* op = "sds_select";
  check_float(clean_in, op, "loss_clean");
  TORCH_CHECK(clean_in.dim() == 2, "fastmeta::sds_select: loss_clean must be [T, N], got ", clean_in.sizes());
  TORCH_CHECK(pert_in.sizes() == clean_in.sizes(), "fastmeta::sds_select: loss_perturbed must have loss_clean's shape ",
              clean_in.sizes(), ", got ", pert_in.sizes());
  check_same_dtype(pert_in, clean_in, op, "loss_perturbed", "loss_clean");
  const int64_t rows = clean_in.size(0), n = clean_in.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "fastmeta::sds_select: k must be in [1, N = ", n, "], got ", k);
  check_device(clean_in, clean_in, op, "loss_clean");
  check_device(pert_in, clean_in, op, "loss_perturbed");
  c10::DeviceGuard guard(clean_in.device());
  const at::Tensor clean = clean_in.contiguous(), pert = pert_in.contiguous();
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

// JSON: the CUDA runtime version of the headers this library was compiled against (nvcc's toolkit)
// and nvcc's architectures, for fastmeta/ops/_cuda.py to compare with torch and the device.
std::string build_info() {
  return std::string("{\"cuda_runtime\": ") + std::to_string(CUDART_VERSION) + ", \"archs\": [" +
         compiled_arch_list() + "]}";
}

// [grid.x, grid.y] of a kernel family for rows x d (launch_config.h), for tests without a GPU.
std::vector<int64_t> launch_grid(const std::string& kernel, int64_t rows, int64_t d) {
  TORCH_CHECK(rows >= 0 && d >= 0, "fastmeta_cuda::launch_grid: rows and d must be >= 0");
  Grid g{};
  if (kernel == "row_elementwise") {
    g = row_elementwise_grid(rows, d);
  } else if (kernel == "sumsq_partial") {
    g = sumsq_partial_grid(rows, d);
  } else if (kernel == "flat") {
    g = flat_grid(rows * d);
  } else if (kernel == "thread_per_row") {
    g = thread_per_row_grid(rows);
  } else if (kernel == "block_per_row") {
    g = block_per_row_grid(rows);
  } else {
    TORCH_CHECK(false, "fastmeta_cuda::launch_grid: unknown kernel family '", kernel,
                "' (row_elementwise, sumsq_partial, flat, thread_per_row, block_per_row)");
  }
  return {g.x, g.y};
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

TORCH_LIBRARY(fastmeta_cuda, m) {
  m.def("build_info() -> str", &fastmeta::cuda::build_info);
  m.def("launch_grid(str kernel, int rows, int d) -> int[]", &fastmeta::cuda::launch_grid);
}
