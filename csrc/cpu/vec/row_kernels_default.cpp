// Row kernels compiled for the default instruction set (flags set in CMakeLists.txt).
#define FASTMETA_VEC_NS baseline
#include "row_kernels_impl.h"

namespace fastmeta::cpu::vec::baseline {

extern const RowKernels<float> kF32 = {"default", sumsq_t<float>, axpy_t<float>, combine_t<float>};
extern const RowKernels<double> kF64 = {"default", sumsq_t<double>, axpy_t<double>, combine_t<double>};

}  // namespace fastmeta::cpu::vec::baseline
