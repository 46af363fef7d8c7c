// Row kernels compiled for the default instruction set (flags set in CMakeLists.txt).
#define FASTMETA_VEC_NS baseline
#include "row_kernels_impl.h"
#include "block_kernels_impl.h"

namespace fastmeta::cpu::vec::baseline {

extern const RowKernels<float> kF32 = {"default", sumsq_t<float>, axpy_t<float>, combine_t<float>};
extern const RowKernels<double> kF64 = {"default", sumsq_t<double>, axpy_t<double>, combine_t<double>};

extern const BlockKernels<float> kBlockF32 = {stats_t<float>, fwd_plane_t<float>, bwd_sums_t<float>, dx_plane_t<float>,
                                                    block_bwd2_t<float>};
extern const BlockKernels<double> kBlockF64 = {stats_t<double>, fwd_plane_t<double>, bwd_sums_t<double>, dx_plane_t<double>,
                                                    block_bwd2_t<double>};
extern const Bf16Kernels kBf16 = {widen_bf16_t, narrow_bf16_t};

}  // namespace fastmeta::cpu::vec::baseline
