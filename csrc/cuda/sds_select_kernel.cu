// fastmeta::sds_select, CUDA: per row, the k samples with the largest loss increase, ordered by
// decreasing increase, ties by lower index, NaN first (as torch.sort and the cpp kernel). One block
// per row; each element's rank is counted against the whole row (O(N^2) per row, N = samples per
// task is small), and elements with rank < k write their index to out[row, rank]. No sort needed.
// Grid block_per_row_grid.
#include "common.cuh"
#include "kernels.h"

namespace fastmeta::cuda {

namespace {
template <typename T>
__device__ inline bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

template <typename T>
__global__ void sds_select_kernel(const T* __restrict__ clean, const T* __restrict__ pert, int64_t* __restrict__ out,
                                  int64_t rows, int64_t n, int64_t k) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const T di = pert[row * n + i] - clean[row * n + i];
      int64_t rank = 0;
      for (int64_t j = 0; j < n; ++j) {
        const T dj = pert[row * n + j] - clean[row * n + j];
        rank += ranks_before(dj, j, di, i) ? 1 : 0;
      }
      if (rank < k) out[row * k + rank] = i;
    }
  }
}
}  // namespace

template <typename T>
cudaError_t launch_sds_select(const T* loss_clean, const T* loss_perturbed, int64_t* out, int64_t rows, int64_t n,
                              int64_t k, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  sds_select_kernel<T><<<to_dim3(block_per_row_grid(rows)), kThreads, 0, stream>>>(loss_clean, loss_perturbed, out,
                                                                                   rows, n, k);
  return cudaGetLastError();
}

template cudaError_t launch_sds_select<float>(const float*, const float*, int64_t*, int64_t, int64_t, int64_t,
                                              cudaStream_t);
template cudaError_t launch_sds_select<double>(const double*, const double*, int64_t*, int64_t, int64_t, int64_t,
                                               cudaStream_t);

}  // namespace fastmeta::cuda
