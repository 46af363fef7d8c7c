// fastmeta::sam_perturb, CUDA (Sharp-MAML eqs. 11, 13): out = theta + radius_t (g*m)_t / max(||(g*m)_t||, eps),
// per row or (global_norm) over all elements. Stage 1: partial sums of squares (common.cuh); for the
// global norm one block adds all partials once (not once per row: T x T*S reads for T rows); stage 2:
// one thread per row turns them into scale_t = radius_t / max(norm, eps); stage 3: the elementwise
// axpy. g and mask are read twice (the norm precedes every write), theta once.
#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

namespace {
__global__ void sum_all_kernel(const double* __restrict__ x, int64_t n, double* __restrict__ out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

template <typename T>
__global__ void sam_scale_kernel(const double* __restrict__ partial, const double* __restrict__ total,
                                 const T* __restrict__ radius, int64_t rows, int64_t bpr, double eps,
                                 double* __restrict__ scale) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    if (total != nullptr) {
      s = *total;
    } else {
      for (int64_t b = 0; b < bpr; ++b) s += partial[row * bpr + b];
    }
    const double norm = sqrt(s);
    // max(norm, eps) that keeps a NaN norm NaN, as the reference's clamp_min (fmax would pick eps).
    scale[row] = static_cast<double>(radius[row]) / (norm < eps ? eps : norm);
  }
}

template <typename T>
__global__ void sam_apply_kernel(const T* __restrict__ theta, int64_t theta_stride, const T* __restrict__ g,
                                 const T* __restrict__ mask, const double* __restrict__ scale, T* __restrict__ out,
                                 int64_t rows, int64_t d) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T s = static_cast<T>(scale[row]);
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x) {
      T x = g[row * d + i];
      if (mask != nullptr) x *= mask[row * d + i];
      out[row * d + i] = theta[row * theta_stride + i] + s * x;
    }
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
  double* total = global_norm ? scale + rows : nullptr;
  sumsq_partial_kernel<T><<<to_dim3(sumsq_partial_grid(rows, d)), kThreads, 0, stream>>>(g, mask, rows, d, bpr,
                                                                                         partial);
  if (global_norm) sum_all_kernel<<<1, kThreads, 0, stream>>>(partial, rows * bpr, total);
  sam_scale_kernel<T><<<to_dim3(thread_per_row_grid(rows)), kThreads, 0, stream>>>(partial, total, radius, rows, bpr,
                                                                                   eps, scale);
  sam_apply_kernel<T><<<to_dim3(row_elementwise_grid(rows, d)), kThreads, 0, stream>>>(theta, theta_stride, g, mask,
                                                                                       scale, out, rows, d);
  return cudaGetLastError();
}

template cudaError_t launch_sam_perturb<float>(const float*, int64_t, const float*, const float*, const float*, float*,
                                               int64_t, int64_t, double, bool, double*, cudaStream_t);
template cudaError_t launch_sam_perturb<double>(const double*, int64_t, const double*, const double*, const double*,
                                                double*, int64_t, int64_t, double, bool, double*, cudaStream_t);

}  // namespace fastmeta::cuda
