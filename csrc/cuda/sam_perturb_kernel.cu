// fastmeta::sam_perturb, CUDA (Sharp-MAML eqs. 11, 13): out = theta + radius_t (g*m)_t / max(||(g*m)_t||, eps),
// per row or (global_norm) over all elements. Stage 1: partial sums of squares (common.cuh);
// stage 2: one thread per row turns them into scale_t = radius_t / max(norm, eps); stage 3: the
// elementwise axpy. g and mask are read twice (the norm precedes every write), theta once.
#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

namespace {
template <typename T>
__global__ void sam_scale_kernel(const double* __restrict__ partial, const T* __restrict__ radius, int64_t rows,
                                 int64_t bpr, double eps, bool global_norm, double* __restrict__ scale) {
  const int64_t row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  double s = 0.0;
  if (global_norm) {
    for (int64_t i = 0; i < rows * bpr; ++i) s += partial[i];
  } else {
    for (int64_t b = 0; b < bpr; ++b) s += partial[row * bpr + b];
  }
  const double norm = sqrt(s);
  scale[row] = static_cast<double>(radius[row]) / (norm > eps ? norm : eps);
}

template <typename T>
__global__ void sam_apply_kernel(const T* __restrict__ theta, int64_t theta_stride, const T* __restrict__ g,
                                 const T* __restrict__ mask, const double* __restrict__ scale, T* __restrict__ out,
                                 int64_t d) {
  const int64_t row = blockIdx.y;
  const T s = static_cast<T>(scale[row]);
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x) {
    T x = g[row * d + i];
    if (mask != nullptr) x *= mask[row * d + i];
    out[row * d + i] = theta[row * theta_stride + i] + s * x;
  }
}
}  // namespace

template <typename T>
cudaError_t launch_sam_perturb(const T* theta, int64_t theta_stride, const T* g, const T* mask, const T* radius,
                               T* out, int64_t rows, int64_t d, double eps, bool global_norm, double* workspace,
                               cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  const int64_t bpr = blocks_per_row(d);
  double* partial = workspace;
  double* scale = workspace + rows * bpr;
  sumsq_partial_kernel<T><<<dim3(bpr, rows), kThreads, 0, stream>>>(g, mask, d, partial);
  sam_scale_kernel<T><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(partial, radius, rows, bpr, eps,
                                                                                  global_norm, scale);
  const int64_t gx = (d + kThreads - 1) / kThreads < 1024 ? (d + kThreads - 1) / kThreads : 1024;
  sam_apply_kernel<T><<<dim3(gx, rows), kThreads, 0, stream>>>(theta, theta_stride, g, mask, scale, out, d);
  return cudaGetLastError();
}

template cudaError_t launch_sam_perturb<float>(const float*, int64_t, const float*, const float*, const float*, float*,
                                               int64_t, int64_t, double, bool, double*, cudaStream_t);
template cudaError_t launch_sam_perturb<double>(const double*, int64_t, const double*, const double*, const double*,
                                                double*, int64_t, int64_t, double, bool, double*, cudaStream_t);

}  // namespace fastmeta::cuda
