// fastmeta::sds_select, CPU (ESAM sharpness-sensitive data selection, Sharp-MAML sec. 5.4):
// per row t, the k indices with the largest increase loss_perturbed - loss_clean, ordered by
// decreasing increase, ties by lower index (NaN ranks first, as torch.sort does, so a NaN loss is
// never silently dropped). Rows are independent: parallel over rows, std::partial_sort per row
// (O(N log k)); N is a per-task sample count, so rows are short and one read suffices.
#include <ATen/ops/empty.h>

#include "common.h"

namespace fastmeta::cpu {

at::Tensor sds_select_cpu(const at::Tensor& clean_in, const at::Tensor& pert_in, int64_t k) {
  check_float(clean_in, "loss_clean");
  TORCH_CHECK(clean_in.dim() == 2 && pert_in.sizes() == clean_in.sizes(),
              "fastmeta::sds_select: losses must be [T, N] of one shape");
  TORCH_CHECK(pert_in.scalar_type() == clean_in.scalar_type(), "fastmeta::sds_select: dtype mismatch");
  const int64_t rows = clean_in.size(0), n = clean_in.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "fastmeta::sds_select: k must be in [1, N]");
  const at::Tensor clean = clean_in.contiguous(), pert = pert_in.contiguous();
  at::Tensor out = at::empty({rows, k}, clean.options().dtype(at::kLong));
  int64_t* op = out.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(clean.scalar_type(), "sds_select_cpu", [&] {
    using T = scalar_t;
    const T* c = clean.const_data_ptr<T>();
    const T* p = pert.const_data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
      std::vector<T> inc(n);
      std::vector<int64_t> idx(n);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t i = 0; i < n; ++i) {
          inc[i] = p[r * n + i] - c[r * n + i];
          idx[i] = i;
        }
        auto before = [&](int64_t a, int64_t b) {
          const bool na = std::isnan(inc[a]), nb = std::isnan(inc[b]);
          if (na || nb) return na && (!nb || a < b);
          return inc[a] > inc[b] || (inc[a] == inc[b] && a < b);
        };
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
        std::copy(idx.begin(), idx.begin() + k, op + r * k);
      }
    });
  });
  return out;
}

}  // namespace fastmeta::cpu
