// fastmeta::swp_mask, CPU (ESAM stochastic weight perturbation, Sharp-MAML sec. 5.4):
//   out[i] = keep(seed, i) ? fill : 0,  fill = 1/keep_prob if rescale else 1,
// with the keep rule every backend shares (csrc/cuda/swp_mask_keep.h: a splitmix64 hash of seed and
// flat index read as a 53-bit uniform), so the mask depends only on (seed, shape), not on the thread
// count, the block split or the backend. One write pass, no reads.
#include "common.h"

namespace fastmeta::cpu {

void swp_mask_cpu(at::Tensor& out, double keep_prob, int64_t seed, bool rescale) {
  check_float(out, "out");
  TORCH_CHECK(out.is_contiguous(), "fastmeta::swp_mask: out must be contiguous");
  TORCH_CHECK(keep_prob > 0.0 && keep_prob <= 1.0, "fastmeta::swp_mask: keep_prob must be in (0, 1], got ",
              keep_prob);
  const int64_t n = out.numel();
  const uint64_t mixed = swp::splitmix64(static_cast<uint64_t>(seed));
  const uint64_t threshold = swp::keep_threshold(keep_prob);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "swp_mask_cpu", [&] {
    using T = scalar_t;
    const T fill = rescale ? static_cast<T>(1.0 / keep_prob) : T(1);
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, n, kSerialElements, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = swp::keep(mixed, static_cast<uint64_t>(i), threshold) ? fill : T(0);
    });
  });
}

}  // namespace fastmeta::cpu
