// fastmeta::swp_mask, CUDA: out[i] = (u(seed, i) < keep_prob) ? fill : 0 with the same counter-based
// uniform (splitmix64, 24 bits) as csrc/cpu/common.h, so a seed gives the same mask as the cpp backend.
#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

namespace {
template <typename T>
__global__ void swp_mask_kernel(T* __restrict__ out, int64_t n, float keep_prob, uint64_t mixed_seed, T fill,
                                bool keep_all) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(splitmix64(mixed_seed + static_cast<uint64_t>(i)) >> 40) * (1.0f / 16777216.0f);
    out[i] = (keep_all || u < keep_prob) ? fill : T(0);
  }
}
}  // namespace

template <typename T>
cudaError_t launch_swp_mask(T* out, int64_t n, double keep_prob, int64_t seed, bool rescale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const T fill = rescale ? static_cast<T>(1.0 / keep_prob) : T(1);
  const int64_t grid = (n + kThreads - 1) / kThreads < 4096 ? (n + kThreads - 1) / kThreads : 4096;
  swp_mask_kernel<T><<<grid, kThreads, 0, stream>>>(out, n, static_cast<float>(keep_prob),
                                                    splitmix64(static_cast<uint64_t>(seed)), fill, keep_prob >= 1.0);
  return cudaGetLastError();
}

template cudaError_t launch_swp_mask<float>(float*, int64_t, double, int64_t, bool, cudaStream_t);
template cudaError_t launch_swp_mask<double>(double*, int64_t, double, int64_t, bool, cudaStream_t);

}  // namespace fastmeta::cuda
