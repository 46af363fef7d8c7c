// fastmeta._C: the pybind11 module. Importing it loads the op registrations (registration.cpp and
// csrc/cpu/); build_info() says how it was built. Needs `import torch` first (libc10/libtorch_cpu).
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/vec/row_kernels.h"

// The torch version comes from setup.py (torch.__version__ of the torch compiled against); the
// torch headers are kept out of this file so torch's bundled pybind11 copy cannot shadow pybind11.
#ifndef FASTMETA_TORCH_VERSION
#define FASTMETA_TORCH_VERSION "unknown"
#endif
#ifndef FASTMETA_CUDA_CONFIG
#define FASTMETA_CUDA_CONFIG "unknown"
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["torch_version"] = FASTMETA_TORCH_VERSION;
  info["compiler"] = std::string(
#if defined(__clang__)
      "clang "
#elif defined(__GNUC__)
      "gcc "
#endif
      ) + __VERSION__;
  info["cplusplus"] = static_cast<long>(__cplusplus);
  info["cxx_standard"] = __cplusplus >= 202002L ? "C++20" : (__cplusplus >= 201703L ? "C++17" : "older");
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#ifdef _OPENMP
  info["openmp"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = py::none();
#endif
  info["cuda_config"] = FASTMETA_CUDA_CONFIG;
  info["cpu_isa"] = fastmeta::cpu::vec::active_isa();
  info["cpu_isas_supported"] = fastmeta::cpu::vec::supported_isas();
  info["stream_threshold_bytes"] = fastmeta::cpu::vec::stream_threshold_bytes();
  info["ops"] = py::make_tuple("row_norm", "sam_perturb", "fd_hvp_points", "fd_hvp_combine", "swp_mask",
                               "sds_select");
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmeta native ops (C++ CPU kernels registered under torch.ops.fastmeta)";
  m.def("build_info", &build_info, "How this extension was built: torch, compiler, C++ standard, OpenMP, CUDA.");
  // Test hooks: run the row kernels on each instruction set this CPU supports, and force the
  // streaming-store path on small tensors.
  m.def("_set_cpu_isa", [](const std::string& name) { return fastmeta::cpu::vec::set_isa(name.c_str()); },
        "Force the row kernels' ISA ('default', 'avx2'; '' = automatic). False if unsupported here.");
  m.def("_cpu_isa", [] { return std::string(fastmeta::cpu::vec::active_isa()); });
  m.def("_set_stream_threshold_bytes", &fastmeta::cpu::vec::set_stream_threshold_bytes,
        "Outputs of at least this many bytes use non-temporal stores (< 0 = default). Returns the old value.");
}
