// Device helpers shared by the fastmeta .cu files (torch-free). The grid rule is launch_config.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launch_config.h"

namespace fastmeta::cuda {

inline dim3 to_dim3(Grid g) { return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y)); }

// Block-wide sum of one double per thread (kThreads threads); result valid in thread 0. Ends with a
// barrier so a block can call it again in a loop without overwriting warp_sums still being read.
__device__ inline double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;
}

// Stage 1: partial[row * bpr + slice] = sum of (g*mask)^2 over the kReduceBlock-wide slice of a row.
// Grid sumsq_partial_grid: slices on x, rows on y, both walked with a grid-stride loop.
template <typename T>
__global__ void sumsq_partial_kernel(const T* __restrict__ g, const T* __restrict__ mask, int64_t rows, int64_t d,
                                     int64_t bpr, double* __restrict__ partial) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t slice = blockIdx.x; slice < bpr; slice += gridDim.x) {
      const int64_t begin = slice * kReduceBlock;
      const int64_t end = begin + kReduceBlock < d ? begin + kReduceBlock : d;
      T acc = T(0);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        T x = g[row * d + i];
        if (mask != nullptr) x *= mask[row * d + i];
        acc += x * x;
      }
      const double s = block_sum(static_cast<double>(acc));
      if (threadIdx.x == 0) partial[row * bpr + slice] = s;
    }
  }
}

}  // namespace fastmeta::cuda
