// fastmeta::fd_hvp_combine, CUDA (Fallah eqs. 10-11):
//   out[d] = mean_t(g_o - inner_lr (g_plus - g_minus) / (2 delta_t))   (or per task, reduce="none").
// Mean: one thread per column walks the T rows (coalesced across the warp), one pass over inputs
// (grid flat_grid); the mean over zero tasks is NaN, as torch.mean of an empty tensor and every
// other backend. None: grid row_elementwise_grid.
#include <math_constants.h>

#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

namespace {
template <typename T>
__global__ void fd_hvp_combine_mean_kernel(const T* __restrict__ go, const T* __restrict__ gp,
                                           const T* __restrict__ gm, const T* __restrict__ delta,
                                           T* __restrict__ out, int64_t rows, int64_t d, double inner_lr) {
  const T inv_t = T(1) / static_cast<T>(rows);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x) {
    if (rows == 0) {
      out[i] = static_cast<T>(CUDART_NAN);
      continue;
    }
    T acc = T(0);
    for (int64_t r = 0; r < rows; ++r) {
      const T c = static_cast<T>(-inner_lr / (2.0 * static_cast<double>(delta[r])));
      acc += go[r * d + i] + c * (gp[r * d + i] - gm[r * d + i]);
    }
    out[i] = acc * inv_t;
  }
}

template <typename T>
__global__ void fd_hvp_combine_none_kernel(const T* __restrict__ go, const T* __restrict__ gp,
                                           const T* __restrict__ gm, const T* __restrict__ delta,
                                           T* __restrict__ out, int64_t rows, int64_t d, double inner_lr) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T c = static_cast<T>(-inner_lr / (2.0 * static_cast<double>(delta[row])));
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x)
      out[row * d + i] = go[row * d + i] + c * (gp[row * d + i] - gm[row * d + i]);
  }
}
}  // namespace

template <typename T>
cudaError_t launch_fd_hvp_combine(const T* g_o, const T* g_plus, const T* g_minus, const T* delta, T* out,
                                  int64_t rows, int64_t d, double inner_lr, bool mean, cudaStream_t stream) {
  if (d == 0) return cudaSuccess;
  if (mean) {
    // Launched for rows == 0 too: it writes the NaNs (out comes uninitialised from at::empty).
    fd_hvp_combine_mean_kernel<T><<<to_dim3(flat_grid(d)), kThreads, 0, stream>>>(g_o, g_plus, g_minus, delta, out,
                                                                                  rows, d, inner_lr);
  } else if (rows > 0) {
    fd_hvp_combine_none_kernel<T><<<to_dim3(row_elementwise_grid(rows, d)), kThreads, 0, stream>>>(
        g_o, g_plus, g_minus, delta, out, rows, d, inner_lr);
  }
  return cudaGetLastError();
}

template cudaError_t launch_fd_hvp_combine<float>(const float*, const float*, const float*, const float*, float*,
                                                  int64_t, int64_t, double, bool, cudaStream_t);
template cudaError_t launch_fd_hvp_combine<double>(const double*, const double*, const double*, const double*,
                                                   double*, int64_t, int64_t, double, bool, cudaStream_t);

}  // namespace fastmeta::cuda
