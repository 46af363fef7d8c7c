// The grid rule of the fastmeta CUDA kernels. Torch-free and CUDA-free, so the glue can also hand it
// to tests on a machine without a GPU (torch.ops.fastmeta_cuda.launch_grid).
//
// CUDA caps gridDim.x at 2^31 - 1 and gridDim.y / gridDim.z at 65,535. Every kernel:
//  * puts columns (or flat elements) on x, as a grid-stride loop: thread i walks
//    i, i + gridDim.x * blockDim.x, ..., so a capped x still covers any D;
//  * puts task rows on y, capped at 65,535: block row blockIdx.y walks rows blockIdx.y,
//    blockIdx.y + gridDim.y, ... (T = 70,000 runs; T <= 65,535 is one row per block row);
//  * one-thread-per-row and one-block-per-row kernels put rows on x, with the same loop.
// Offsets are int64 everywhere: row * d may pass 2^31.
#pragma once

#include <cstdint>

namespace fastmeta::cuda {

constexpr int kThreads = 256;
// Elements one block reduces in the first stage of a two-stage row reduction.
constexpr int64_t kReduceBlock = 8192;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
// x caps of the grid-stride kernels: a few waves of blocks on an H100 (132 SMs x 8 blocks of 256).
constexpr int64_t kMaxRowBlocks = 1024;
constexpr int64_t kMaxFlatBlocks = 4096;

struct Grid {
  int64_t x, y;
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp_grid(int64_t n, int64_t cap) { return n < 1 ? 1 : (n < cap ? n : cap); }
inline int64_t blocks_per_row(int64_t d) { return d == 0 ? 1 : cdiv(d, kReduceBlock); }

// Elementwise over [rows, d] (fd_hvp_points, fd_hvp_combine "none", sam_perturb's axpy).
inline Grid row_elementwise_grid(int64_t rows, int64_t d) {
  return {clamp_grid(cdiv(d, kThreads), kMaxRowBlocks), clamp_grid(rows, kMaxGridYZ)};
}
// Stage 1 of a row reduction: one block per kReduceBlock slice of a row on x, rows on y.
inline Grid sumsq_partial_grid(int64_t rows, int64_t d) {
  return {clamp_grid(blocks_per_row(d), kMaxGridX), clamp_grid(rows, kMaxGridYZ)};
}
// Flat over n elements or columns (swp_mask, fd_hvp_combine "mean").
inline Grid flat_grid(int64_t n) { return {clamp_grid(cdiv(n, kThreads), kMaxFlatBlocks), 1}; }
// One thread per row (the second stage of a row reduction).
inline Grid thread_per_row_grid(int64_t rows) { return {clamp_grid(cdiv(rows, kThreads), kMaxGridX), 1}; }
// One block per row (sds_select).
inline Grid block_per_row_grid(int64_t rows) { return {clamp_grid(rows, kMaxGridX), 1}; }

}  // namespace fastmeta::cuda
