// fastmeta::row_norm, CUDA: out[t] = sqrt(sum_d g[t,d]^2). Two-stage reduction (apex
// multi_tensor_l2norm style): stage 1 grid (blocks_per_row, rows) writes double partial sums,
// stage 2 one thread per row adds them in a fixed order (deterministic, no atomics). One read of g.
#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

int64_t reduction_workspace(int64_t rows, int64_t d) { return rows * blocks_per_row(d) + rows; }

namespace {
template <typename T>
__global__ void row_norm_finish_kernel(const double* __restrict__ partial, int64_t rows, int64_t bpr,
                                       T* __restrict__ out) {
  const int64_t row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  double s = 0.0;
  for (int64_t b = 0; b < bpr; ++b) s += partial[row * bpr + b];
  out[row] = static_cast<T>(sqrt(s));
}
}  // namespace

template <typename T>
cudaError_t launch_row_norm(const T* g, T* out, int64_t rows, int64_t d, double* workspace, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t bpr = blocks_per_row(d);
  sumsq_partial_kernel<T><<<dim3(bpr, rows), kThreads, 0, stream>>>(g, nullptr, d, workspace);
  row_norm_finish_kernel<T><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(workspace, rows, bpr, out);
  return cudaGetLastError();
}

template cudaError_t launch_row_norm<float>(const float*, float*, int64_t, int64_t, double*, cudaStream_t);
template cudaError_t launch_row_norm<double>(const double*, double*, int64_t, int64_t, double*, cudaStream_t);

}  // namespace fastmeta::cuda
