// Torch-free kernels of the fused conv-block tail
//     y = max_pool2d(leaky_relu(batch_norm(x, batch statistics) * gamma + beta, slope), kernel 2, stride 2)
// (the block of Conv-4 and most few-shot conv nets; slope 0 is ReLU, 0.1 ResNet-12's LeakyReLU),
// and the same without the pool (the *_flat kernels), compiled once per instruction set like the
// row kernels (row_kernels.h) and chosen by the same run-time ISA switch. slope >= 0 makes the
// activation non-decreasing, so the pool's maximum is the activation of the maximum of z.
//
// Layout: the forward and backward work on the H x W planes of an NCHW tensor (in memory order) or
// on one image of a channels_last tensor; the double backward works on one channel c of an NCHW
// tensor: image i's plane starts at x + i * img_stride, and the pooled tensors follow the same
// pattern with their own image stride. idx[o] in {0, 1, 2, 3} is the position of the window's
// first maximum (row-major: 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1)), the element
// max_pool2d's index would name, plus 4 when the window's maximum z is <= 0: the activation then
// passes slope * grad_out to that element (nothing for ReLU). Without the pool, idx has x's shape
// and is 0 or 4 per element.
#pragma once

#include <cstdint>

namespace fastmeta::cpu::vec {

template <typename T>
struct BlockKernels {
  // Statistics of one plane of n elements: *s1 += sum (x - shift), *s2 += sum (x - shift)^2.
  void (*stats)(const T* x, int64_t n, T shift, double* s1, double* s2);
  // Forward of one h x w plane: z = x * scale + shift (batch norm with the channel's statistics),
  // relu, 2x2 max-pool: out and idx are the plane's [h/2, w/2] outputs.
  void (*fwd_plane)(const T* x, int64_t h, int64_t w, T scale, T shift, T slope, T* out, uint8_t* idx);
  // Backward pass 1 of one plane: dz is grad_out routed to each window's index (zero elsewhere);
  // *sdz += sum dz, *sdzx += sum dz * (x - mean).
  void (*bwd_sums)(const T* x, int64_t h, int64_t w, const T* grad_out, const uint8_t* idx, T mean, T slope,
                   double* sdz, double* sdzx);
  // Backward pass 2 of one plane: dx = c1 * (x - mean) + c0 + kg * dz, with the channel's
  // constants from pass 1 (the batch-norm backward of Ioffe & Szegedy 2015, sec. 3: dx = gamma *
  // invstd * (dz - mean(dz) - xhat * mean(dz * xhat))).
  void (*dx_plane)(const T* x, int64_t h, int64_t w, const T* grad_out, const uint8_t* idx, T mean, T c1, T c0,
                   T kg, T slope, T* dx);
  // The same for channels_last tensors, one image ([h, w, c] in memory) per call, with per-channel
  // constant arrays of c.
  void (*stats_nhwc)(const T* x, int64_t positions, int64_t c, const T* shift, double* s1, double* s2);
  void (*fwd_nhwc)(const T* x, int64_t h, int64_t w, int64_t c, const T* scale, const T* shift, T slope, T* out,
                   uint8_t* idx);
  void (*bwd_sums_nhwc)(const T* x, int64_t h, int64_t w, int64_t c, const T* grad_out, const uint8_t* idx,
                        const T* mean, T slope, double* sdz, double* sdzx);
  void (*dx_nhwc)(const T* x, int64_t h, int64_t w, int64_t c, const T* grad_out, const uint8_t* idx, const T* mean,
                  const T* c1, const T* c0, const T* kg, T slope, T* dx);
  // No pool: n elements of one channel (an NCHW plane), or positions x c of one channels_last image.
  void (*fwd_flat)(const T* x, int64_t n, T scale, T shift, T slope, T* out, uint8_t* idx);
  void (*bwd_sums_flat)(const T* x, int64_t n, const T* grad_out, const uint8_t* idx, T mean, T slope, double* sdz,
                        double* sdzx);
  void (*dx_flat)(const T* x, int64_t n, const T* grad_out, const uint8_t* idx, T mean, T c1, T c0, T kg, T slope,
                  T* dx);
  void (*fwd_flat_nhwc)(const T* x, int64_t positions, int64_t c, const T* scale, const T* shift, T slope, T* out,
                        uint8_t* idx);
  void (*bwd_sums_flat_nhwc)(const T* x, int64_t positions, int64_t c, const T* grad_out, const uint8_t* idx,
                             const T* mean, T slope, double* sdz, double* sdzx);
  void (*dx_flat_nhwc)(const T* x, int64_t positions, int64_t c, const T* grad_out, const uint8_t* idx, const T* mean,
                       const T* c1, const T* c0, const T* kg, T slope, T* dx);
  // Double backward of one channel: the gradient of L = sum a * dx + a_gamma * dgamma + a_beta *
  // dbeta (dx, dgamma, dbeta of the backward; a may be null = 0) with respect to grad_out (g_grad_out,
  // the output's layout), x (g_x, through xhat, the mean and invstd) and gamma (*g_gamma). The
  // window routing and the activation's slope are piecewise constant in x, gamma and beta and
  // contribute nothing. Formulas: see block_kernels_impl.h.
  void (*bwd2)(const T* a, double a_gamma, double a_beta, const T* grad_out, const uint8_t* idx,
               int64_t out_img_stride, const T* x, int64_t n, int64_t img_stride, int64_t h, int64_t w, T gamma,
               double mean, double invstd, double slope, bool pool, T* g_grad_out, T* g_x, double* g_gamma);
};

// The forward and backward plane kernels for bfloat16 activations (its raw uint16 bits), computed
// in float32 with float32 per-channel constants: widened in registers, outputs rounded to nearest
// even (NaN stays NaN), as c10::BFloat16 does.
struct BlockKernelsBf16 {
  void (*stats)(const uint16_t* x, int64_t n, float shift, double* s1, double* s2);
  void (*fwd_plane)(const uint16_t* x, int64_t h, int64_t w, float scale, float shift, float slope, uint16_t* out,
                    uint8_t* idx);
  void (*bwd_sums)(const uint16_t* x, int64_t h, int64_t w, const uint16_t* grad_out, const uint8_t* idx, float mean,
                   float slope, double* sdz, double* sdzx);
  void (*dx_plane)(const uint16_t* x, int64_t h, int64_t w, const uint16_t* grad_out, const uint8_t* idx, float mean,
                   float c1, float c0, float kg, float slope, uint16_t* dx);
  void (*stats_nhwc)(const uint16_t* x, int64_t positions, int64_t c, const float* shift, double* s1, double* s2);
  void (*fwd_nhwc)(const uint16_t* x, int64_t h, int64_t w, int64_t c, const float* scale, const float* shift,
                   float slope, uint16_t* out, uint8_t* idx);
  void (*bwd_sums_nhwc)(const uint16_t* x, int64_t h, int64_t w, int64_t c, const uint16_t* grad_out,
                        const uint8_t* idx, const float* mean, float slope, double* sdz, double* sdzx);
  void (*dx_nhwc)(const uint16_t* x, int64_t h, int64_t w, int64_t c, const uint16_t* grad_out, const uint8_t* idx,
                  const float* mean, const float* c1, const float* c0, const float* kg, float slope, uint16_t* dx);
  void (*fwd_flat)(const uint16_t* x, int64_t n, float scale, float shift, float slope, uint16_t* out, uint8_t* idx);
  void (*bwd_sums_flat)(const uint16_t* x, int64_t n, const uint16_t* grad_out, const uint8_t* idx, float mean,
                        float slope, double* sdz, double* sdzx);
  void (*dx_flat)(const uint16_t* x, int64_t n, const uint16_t* grad_out, const uint8_t* idx, float mean, float c1,
                  float c0, float kg, float slope, uint16_t* dx);
  void (*fwd_flat_nhwc)(const uint16_t* x, int64_t positions, int64_t c, const float* scale, const float* shift,
                        float slope, uint16_t* out, uint8_t* idx);
  void (*bwd_sums_flat_nhwc)(const uint16_t* x, int64_t positions, int64_t c, const uint16_t* grad_out,
                             const uint8_t* idx, const float* mean, float slope, double* sdz, double* sdzx);
  void (*dx_flat_nhwc)(const uint16_t* x, int64_t positions, int64_t c, const uint16_t* grad_out, const uint8_t* idx,
                       const float* mean, const float* c1, const float* c0, const float* kg, float slope,
                       uint16_t* dx);
};
const BlockKernelsBf16& block_kernels_bf16();

// The kernels of the active ISA (see row_kernels.h: set_isa / active_isa).
const BlockKernels<float>& block_kernels_f32();
const BlockKernels<double>& block_kernels_f64();
template <typename T>
inline const BlockKernels<T>& block_kernels();
template <>
inline const BlockKernels<float>& block_kernels<float>() { return block_kernels_f32(); }
template <>
inline const BlockKernels<double>& block_kernels<double>() { return block_kernels_f64(); }

}  // namespace fastmeta::cpu::vec
