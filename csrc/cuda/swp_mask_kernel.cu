// fastmeta::swp_mask, CUDA: out[i] = keep(seed, i) ? fill : 0 with swp::keep of swp_mask_keep.h, the
// same function the CPU kernel calls, so a seed gives the same mask on every backend. Grid flat_grid.
#include "common.cuh"
#include "kernels.h"
#include "swp_mask_keep.h"

namespace fastmeta::cuda {

namespace {
template <typename T>
__global__ void swp_mask_kernel(T* __restrict__ out, int64_t n, uint64_t mixed_seed, uint64_t threshold, T fill) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = swp::keep(mixed_seed, static_cast<uint64_t>(i), threshold) ? fill : T(0);
}
}  // namespace

template <typename T>
cudaError_t launch_swp_mask(T* out, int64_t n, double keep_prob, int64_t seed, bool rescale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const T fill = rescale ? static_cast<T>(1.0 / keep_prob) : T(1);
  swp_mask_kernel<T><<<to_dim3(flat_grid(n)), kThreads, 0, stream>>>(
      out, n, swp::splitmix64(static_cast<uint64_t>(seed)), swp::keep_threshold(keep_prob), fill);
  return cudaGetLastError();
}

template cudaError_t launch_swp_mask<float>(float*, int64_t, double, int64_t, bool, cudaStream_t);
template cudaError_t launch_swp_mask<double>(double*, int64_t, double, int64_t, bool, cudaStream_t);

}  // namespace fastmeta::cuda
