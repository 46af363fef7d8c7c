// The kernel tables of one instruction set: included once by each row_kernels_<isa>.cpp, after
// it defines FASTMETA_VEC_NS (the ISA's namespace) and FASTMETA_VEC_ISA (its name, "default" or
// "avx2"); that file's compiler flags decide the instruction set. dispatch.cpp picks a table.
#include "block_kernels_impl.h"
#include "row_kernels_impl.h"

namespace fastmeta::cpu::vec::FASTMETA_VEC_NS {

extern const RowKernels<float> kF32 = {FASTMETA_VEC_ISA, sumsq_t<float>, axpy_t<float>, combine_t<float>};
extern const RowKernels<double> kF64 = {FASTMETA_VEC_ISA, sumsq_t<double>, axpy_t<double>, combine_t<double>};

#define FASTMETA_BLOCK_TABLE(T, S)                                                                            \
  stats_t<T, S>, fwd_plane_t<T, S>, bwd_sums_t<T, S>, dx_plane_t<T, S>, stats_nhwc_t<T, S>, fwd_nhwc_t<T, S>,  \
      bwd_sums_nhwc_t<T, S>, dx_nhwc_t<T, S>, fwd_flat_t<T, S>, bwd_sums_flat_t<T, S>, dx_flat_t<T, S>,        \
      fwd_flat_nhwc_t<T, S>, bwd_sums_flat_nhwc_t<T, S>, dx_flat_nhwc_t<T, S>
extern const BlockKernels<float> kBlockF32 = {FASTMETA_BLOCK_TABLE(float, float), block_bwd2_t<float>};
extern const BlockKernels<double> kBlockF64 = {FASTMETA_BLOCK_TABLE(double, double), block_bwd2_t<double>};
extern const BlockKernelsBf16 kBlockBf16 = {FASTMETA_BLOCK_TABLE(float, uint16_t)};
#undef FASTMETA_BLOCK_TABLE

}  // namespace fastmeta::cpu::vec::FASTMETA_VEC_NS
