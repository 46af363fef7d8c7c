// Row kernels compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#define FASTMETA_VEC_NS avx2
#include "row_kernels_impl.h"

namespace fastmeta::cpu::vec::avx2 {

extern const RowKernels<float> kF32 = {"avx2", sumsq_t<float>, axpy_t<float>, combine_t<float>};
extern const RowKernels<double> kF64 = {"avx2", sumsq_t<double>, axpy_t<double>, combine_t<double>};

}  // namespace fastmeta::cpu::vec::avx2
