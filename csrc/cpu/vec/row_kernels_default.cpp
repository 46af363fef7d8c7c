// Row and block kernels compiled for the default instruction set (flags set in CMakeLists.txt).
#define FASTMETA_VEC_NS baseline
#define FASTMETA_VEC_ISA "default"
#include "kernel_tables.h"
