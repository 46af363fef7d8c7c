// Torch-free launch functions of the fastmeta CUDA kernels: raw pointers, sizes, a cudaStream_t,
// returning cudaError_t. Compiled by bare nvcc (sm_80, sm_90); the torch glue is cuda_glue.cpp.
// All matrices are contiguous row-major [rows, d]; theta_stride is 0 (broadcast [D]) or d. Grids follow
// launch_config.h (any rows, any d within CUDA's limits; int64 offsets).
// NOT RUN on a GPU in this project's CI (no GPU there): compiled and registered only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastmeta::cuda {

// Workspace (doubles) that launch_row_norm / launch_sam_perturb need for their two-stage reduction.
int64_t reduction_workspace(int64_t rows, int64_t d);

// The architectures nvcc compiled the kernels for, as __CUDA_ARCH_LIST__ spells them ("800,900").
const char* compiled_arch_list();

template <typename T>
cudaError_t launch_row_norm(const T* g, T* out, int64_t rows, int64_t d, double* workspace, cudaStream_t stream);

template <typename T>
cudaError_t launch_sam_perturb(const T* theta, int64_t theta_stride, const T* g, const T* mask, const T* radius,
                               T* out, int64_t rows, int64_t d, double eps, bool global_norm, double* workspace,
                               cudaStream_t stream);

template <typename T>
cudaError_t launch_fd_hvp_points(const T* theta, int64_t theta_stride, const T* v, const T* delta, T* out,
                                 int64_t rows, int64_t d, cudaStream_t stream);

template <typename T>
cudaError_t launch_fd_hvp_combine(const T* g_o, const T* g_plus, const T* g_minus, const T* delta, T* out,
                                  int64_t rows, int64_t d, double inner_lr, bool mean, cudaStream_t stream);

template <typename T>
cudaError_t launch_swp_mask(T* out, int64_t n, double keep_prob, int64_t seed, bool rescale, cudaStream_t stream);

template <typename T>
cudaError_t launch_sds_select(const T* loss_clean, const T* loss_perturbed, int64_t* out, int64_t rows, int64_t n,
                              int64_t k, cudaStream_t stream);

}  // namespace fastmeta::cuda
