// The kernel tables of one instruction set: included once by each row_kernels_<isa>.cpp, after
// it defines FASTMETA_VEC_NS (the ISA's namespace) and FASTMETA_VEC_ISA (its name, "default" or
// "avx2"); that file's compiler flags decide the instruction set. dispatch.cpp picks a table.
#include "block_kernels_impl.h"
#include "row_kernels_impl.h"

namespace fastmeta::cpu::vec::FASTMETA_VEC_NS {

extern const RowKernels<float> kF32 = {FASTMETA_VEC_ISA, sumsq_t<float>, axpy_t<float>, combine_t<float>};
extern const RowKernels<double> kF64 = {FASTMETA_VEC_ISA, sumsq_t<double>, axpy_t<double>, combine_t<double>};

extern const BlockKernels<float> kBlockF32 = {
    stats_t<float, float>,      fwd_plane_t<float, float>,   bwd_sums_t<float, float>,      dx_plane_t<float, float>,
    stats_nhwc_t<float, float>, fwd_nhwc_t<float, float>,    bwd_sums_nhwc_t<float, float>, dx_nhwc_t<float, float>,
    block_bwd2_t<float>};
extern const BlockKernels<double> kBlockF64 = {
    stats_t<double, double>,      fwd_plane_t<double, double>, bwd_sums_t<double, double>,
    dx_plane_t<double, double>,   stats_nhwc_t<double, double>, fwd_nhwc_t<double, double>,
    bwd_sums_nhwc_t<double, double>, dx_nhwc_t<double, double>, block_bwd2_t<double>};
extern const BlockKernelsBf16 kBlockBf16 = {
    stats_t<float, uint16_t>,      fwd_plane_t<float, uint16_t>, bwd_sums_t<float, uint16_t>,
    dx_plane_t<float, uint16_t>,   stats_nhwc_t<float, uint16_t>, fwd_nhwc_t<float, uint16_t>,
    bwd_sums_nhwc_t<float, uint16_t>, dx_nhwc_t<float, uint16_t>};

}  // namespace fastmeta::cpu::vec::FASTMETA_VEC_NS
