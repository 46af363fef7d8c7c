// Every fastmeta native op schema, in one TORCH_LIBRARY block, and the CPU kernels for them.
// These are the raw kernels behind the "cpp" (and, from _C_cuda, "cuda") backend; the public,
// differentiable, torch.compile-able ops are the Python custom ops in fastmeta/ops/ (namespace
// fastmeta_ops), whose bodies choose a backend in fastmeta/ops/_backend.py.
#include <torch/library.h>

#include <optional>

namespace fastmeta::cpu {
at::Tensor row_norm_cpu(const at::Tensor& g);
at::Tensor sam_perturb_cpu(const at::Tensor& theta, const at::Tensor& g, const at::Tensor& radius,
                           const std::optional<at::Tensor>& mask, double eps, bool global_norm);
at::Tensor fd_hvp_points_cpu(const at::Tensor& theta, const at::Tensor& v, const at::Tensor& delta);
at::Tensor fd_hvp_combine_cpu(const at::Tensor& g_o, const at::Tensor& g_plus, const at::Tensor& g_minus,
                              const at::Tensor& delta, double inner_lr, bool mean);
void swp_mask_cpu(at::Tensor& out, double keep_prob, int64_t seed, bool rescale);
at::Tensor sds_select_cpu(const at::Tensor& loss_clean, const at::Tensor& loss_perturbed, int64_t k);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    double negative_slope, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& idx, double negative_slope, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cpu(
    const std::optional<at::Tensor>& ggx, const std::optional<at::Tensor>& ggw, const std::optional<at::Tensor>& ggb,
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& idx, double negative_slope, bool pool);
}  // namespace fastmeta::cpu

TORCH_LIBRARY(fastmeta, m) {
  m.def("row_norm(Tensor g) -> Tensor");
  m.def("sam_perturb(Tensor theta, Tensor g, Tensor radius, Tensor? mask, float eps, bool global_norm) -> Tensor");
  m.def("fd_hvp_points(Tensor theta, Tensor v, Tensor delta) -> Tensor");
  m.def("fd_hvp_combine(Tensor g_o, Tensor g_plus, Tensor g_minus, Tensor delta, float inner_lr, bool mean) -> Tensor");
  m.def("swp_mask(Tensor(a!) out, float keep_prob, int seed, bool rescale) -> ()");
  m.def("sds_select(Tensor loss_clean, Tensor loss_perturbed, int k) -> Tensor");
  // negative_slope: the LeakyReLU slope (0: ReLU); pool: 2x2 max-pool after the activation or none.
  m.def("bn_relu_pool(Tensor x, Tensor? weight, Tensor? bias, float eps, float negative_slope=0.0, bool pool=True)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_relu_pool_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor idx,"
        " float negative_slope=0.0, bool pool=True) -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_pool_double_backward(Tensor? ggx, Tensor? ggw, Tensor? ggb, Tensor grad_out, Tensor x, Tensor? weight,"
        " Tensor mean, Tensor invstd, Tensor idx, float negative_slope=0.0, bool pool=True) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("row_norm", &fastmeta::cpu::row_norm_cpu);
  m.impl("sam_perturb", &fastmeta::cpu::sam_perturb_cpu);
  m.impl("fd_hvp_points", &fastmeta::cpu::fd_hvp_points_cpu);
  m.impl("fd_hvp_combine", &fastmeta::cpu::fd_hvp_combine_cpu);
  m.impl("swp_mask", &fastmeta::cpu::swp_mask_cpu);
  m.impl("sds_select", &fastmeta::cpu::sds_select_cpu);
  m.impl("bn_relu_pool", &fastmeta::cpu::bn_relu_pool_cpu);
  m.impl("bn_relu_pool_backward", &fastmeta::cpu::bn_relu_pool_backward_cpu);
  m.impl("bn_relu_pool_double_backward", &fastmeta::cpu::bn_relu_pool_double_backward_cpu);
}
