// The swp_mask keep rule, shared by the CPU kernel (csrc/cpu/swp_mask_cpu.cpp) and the CUDA kernel
// (swp_mask_kernel.cu), and implemented bit for bit by the reference and Triton backends
// (fastmeta/ops/swp_mask.py states the rule):
//   h_i    = splitmix64(splitmix64(seed) + i)      uint64 arithmetic, i = flat index
//   keep_i = (h_i >> 11) < ceil(keep_prob * 2^53)
// (h_i >> 11) / 2^53 is a uniform double in [0, 1) with 53 random bits; keep_prob = 1 keeps all.
// Torch-free and CUDA-runtime-free: plain C++ for the host compiler, __host__ __device__ under nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTMETA_HOST_DEVICE __host__ __device__
#else
#define FASTMETA_HOST_DEVICE
#endif

namespace fastmeta::swp {

FASTMETA_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// mixed_seed = splitmix64(seed), computed once per launch on the host.
FASTMETA_HOST_DEVICE inline bool keep(uint64_t mixed_seed, uint64_t index, uint64_t threshold) {
  return (splitmix64(mixed_seed + index) >> 11) < threshold;
}

// ceil(keep_prob * 2^53): exact in double (a power-of-two scaling), at most 2^53 for keep_prob <= 1.
inline uint64_t keep_threshold(double keep_prob) {
  return static_cast<uint64_t>(std::ceil(std::ldexp(keep_prob, 53)));
}

}  // namespace fastmeta::swp
