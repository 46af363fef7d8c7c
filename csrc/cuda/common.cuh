// Device helpers shared by the fastmeta .cu files (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta::cuda {

constexpr int kThreads = 256;
// Elements one block reduces in the first stage of a two-stage row reduction.
constexpr int64_t kReduceBlock = 8192;

inline int64_t blocks_per_row(int64_t d) { return d == 0 ? 1 : (d + kReduceBlock - 1) / kReduceBlock; }

// Block-wide sum of one double per thread (kThreads threads); result valid in thread 0.
__device__ inline double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Stage 1: partial[row * bpr + blockIdx.x] = sum of (g*mask)^2 over one kReduceBlock slice.
template <typename T>
__global__ void sumsq_partial_kernel(const T* __restrict__ g, const T* __restrict__ mask, int64_t d,
                                     double* __restrict__ partial) {
  const int64_t row = blockIdx.y, bpr = gridDim.x;
  const int64_t begin = blockIdx.x * kReduceBlock;
  const int64_t end = begin + kReduceBlock < d ? begin + kReduceBlock : d;
  T acc = T(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    T x = g[row * d + i];
    if (mask != nullptr) x *= mask[row * d + i];
    acc += x * x;
  }
  const double s = block_sum(static_cast<double>(acc));
  if (threadIdx.x == 0) partial[row * bpr + blockIdx.x] = s;
}

inline uint64_t __host__ __device__ splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace fastmeta::cuda
