// fastmeta::fd_hvp_points, CUDA (Fallah eqs. 9, 11): rows theta + delta_t v_t, then theta - delta_t v_t.
// One read of v and theta per element writes both output rows. Grid row_elementwise_grid.
#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

namespace {
template <typename T>
__global__ void fd_hvp_points_kernel(const T* __restrict__ theta, int64_t theta_stride, const T* __restrict__ v,
                                     const T* __restrict__ delta, T* __restrict__ out, int64_t rows, int64_t d) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T dt = delta[row];
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x) {
      const T th = theta[row * theta_stride + i];
      const T step = dt * v[row * d + i];
      out[row * d + i] = th + step;
      out[(rows + row) * d + i] = th - step;
    }
  }
}
}  // namespace

template <typename T>
cudaError_t launch_fd_hvp_points(const T* theta, int64_t theta_stride, const T* v, const T* delta, T* out,
                                 int64_t rows, int64_t d, cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  fd_hvp_points_kernel<T><<<to_dim3(row_elementwise_grid(rows, d)), kThreads, 0, stream>>>(theta, theta_stride, v,
                                                                                           delta, out, rows, d);
  return cudaGetLastError();
}

template cudaError_t launch_fd_hvp_points<float>(const float*, int64_t, const float*, const float*, float*, int64_t,
                                                 int64_t, cudaStream_t);
template cudaError_t launch_fd_hvp_points<double>(const double*, int64_t, const double*, const double*, double*,
                                                  int64_t, int64_t, cudaStream_t);

}  // namespace fastmeta::cuda
