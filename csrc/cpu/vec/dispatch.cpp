// Run-time choice of the kernels' instruction set (kernel_tables.h), and the streaming-store threshold.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "block_kernels.h"
#include "row_kernels.h"

namespace fastmeta::cpu::vec {

// The tables each row_kernels_<isa>.cpp defines (kernel_tables.h).
#define FASTMETA_VEC_TABLES                 \
  extern const RowKernels<float> kF32;      \
  extern const RowKernels<double> kF64;     \
  extern const BlockKernels<float> kBlockF32; \
  extern const BlockKernels<double> kBlockF64; \
  extern const BlockKernelsBf16 kBlockBf16;

namespace baseline {
FASTMETA_VEC_TABLES
}  // namespace baseline
#if FASTMETA_VEC_AVX2
namespace avx2 {
FASTMETA_VEC_TABLES
}  // namespace avx2
#endif

namespace {

bool cpu_has_avx2() {
#if FASTMETA_VEC_AVX2 && (defined(__x86_64__) || defined(__i386__))
  // Called from a static initializer (g_isa below), which may run before libgcc's own CPU
  // detection constructor: GCC requires the explicit init in that case.
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// 0 = baseline, 1 = avx2. Read on every kernel call (one relaxed load), so the test hook applies at once.
std::atomic<int> g_isa{cpu_has_avx2() ? 1 : 0};

// Size of the largest cache cpu0 sees, from sysfs ("32768K"): on AMD EPYC that is one CCX's L3,
// while sysconf(_SC_LEVEL3_CACHE_SIZE) reports the whole package's (384 MiB on this VM, which would
// put the streaming threshold out of reach of every realistic output). 0 if sysfs has no answer.
int64_t sysfs_llc_bytes() {
  int64_t best = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    std::string text;
    if (!(f >> text) || text.empty()) continue;
    char* end = nullptr;
    int64_t v = std::strtoll(text.c_str(), &end, 10);
    if (end != nullptr && (*end == 'K' || *end == 'k')) v <<= 10;
    if (end != nullptr && (*end == 'M' || *end == 'm')) v <<= 20;
    best = std::max(best, v);
  }
  return best;
}

int64_t default_stream_threshold() {
  long llc = static_cast<long>(sysfs_llc_bytes());
#ifdef _SC_LEVEL3_CACHE_SIZE
  if (llc <= 0) llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
#ifdef _SC_LEVEL2_CACHE_SIZE
  if (llc <= 0) llc = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  // An output beyond half the last-level cache would evict the inputs it is computed from, and
  // the consumer would read it back from DRAM anyway: stream it.
  return llc > 0 ? static_cast<int64_t>(llc) / 2 : (int64_t{8} << 20);
}

std::atomic<int64_t> g_stream_threshold{default_stream_threshold()};

}  // namespace

// One relaxed load per kernel call: the test hook set_isa applies at once.
#if FASTMETA_VEC_AVX2
#define FASTMETA_BY_ISA(table) (g_isa.load(std::memory_order_relaxed) == 1 ? avx2::table : baseline::table)
#else
#define FASTMETA_BY_ISA(table) (baseline::table)
#endif

const RowKernels<float>& kernels_f32() { return FASTMETA_BY_ISA(kF32); }
const RowKernels<double>& kernels_f64() { return FASTMETA_BY_ISA(kF64); }
const BlockKernels<float>& block_kernels_f32() { return FASTMETA_BY_ISA(kBlockF32); }
const BlockKernels<double>& block_kernels_f64() { return FASTMETA_BY_ISA(kBlockF64); }
const BlockKernelsBf16& block_kernels_bf16() { return FASTMETA_BY_ISA(kBlockBf16); }

const char* active_isa() { return kernels_f32().isa; }

const char* supported_isas() { return cpu_has_avx2() ? "avx2,default" : "default"; }

bool set_isa(const char* name) {
  if (name == nullptr || std::strcmp(name, "") == 0) {
    g_isa.store(cpu_has_avx2() ? 1 : 0);
    return true;
  }
  if (std::strcmp(name, "default") == 0) {
    g_isa.store(0);
    return true;
  }
  if (std::strcmp(name, "avx2") == 0 && cpu_has_avx2()) {
    g_isa.store(1);
    return true;
  }
  return false;
}

int64_t stream_threshold_bytes() { return g_stream_threshold.load(std::memory_order_relaxed); }

int64_t set_stream_threshold_bytes(int64_t bytes) {
  return g_stream_threshold.exchange(bytes < 0 ? default_stream_threshold() : bytes);
}

}  // namespace fastmeta::cpu::vec
