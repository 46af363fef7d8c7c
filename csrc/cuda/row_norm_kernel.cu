// fastmeta::row_norm, CUDA: out[t] = sqrt(sum_d g[t,d]^2). Two-stage reduction (apex
// multi_tensor_l2norm style): stage 1 (sumsq_partial_grid) writes double partial sums, stage 2 one
// thread per row adds them in a fixed order (deterministic, no atomics). One read of g.
#include "common.cuh"
#include "kernels.h"

#define FASTMETA_STRINGIFY_(...) #__VA_ARGS__
#define FASTMETA_STRINGIFY(...) FASTMETA_STRINGIFY_(__VA_ARGS__)

namespace fastmeta::cuda {

// partials, then one scale per row (sam_perturb), then the global total (sam_perturb global_norm).
int64_t reduction_workspace(int64_t rows, int64_t d) { return rows * blocks_per_row(d) + rows + 1; }

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every pass; every .cu file of the library is
// compiled with the same architectures, so this one answers for all of them.
const char* compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return FASTMETA_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

namespace {
template <typename T>
__global__ void row_norm_finish_kernel(const double* __restrict__ partial, int64_t rows, int64_t bpr,
                                       T* __restrict__ out) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t b = 0; b < bpr; ++b) s += partial[row * bpr + b];
    out[row] = static_cast<T>(sqrt(s));
  }
}
}  // namespace

template <typename T>
cudaError_t launch_row_norm(const T* g, T* out, int64_t rows, int64_t d, double* workspace, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t bpr = blocks_per_row(d);
  sumsq_partial_kernel<T><<<to_dim3(sumsq_partial_grid(rows, d)), kThreads, 0, stream>>>(g, nullptr, rows, d, bpr,
                                                                                         workspace);
  row_norm_finish_kernel<T><<<to_dim3(thread_per_row_grid(rows)), kThreads, 0, stream>>>(workspace, rows, bpr, out);
  return cudaGetLastError();
}

template cudaError_t launch_row_norm<float>(const float*, float*, int64_t, int64_t, double*, cudaStream_t);
template cudaError_t launch_row_norm<double>(const double*, double*, int64_t, int64_t, double*, cudaStream_t);

}  // namespace fastmeta::cuda
