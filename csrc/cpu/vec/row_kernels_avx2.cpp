// Row and block kernels compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#define FASTMETA_VEC_NS avx2
#define FASTMETA_VEC_ISA "avx2"
#include "kernel_tables.h"
