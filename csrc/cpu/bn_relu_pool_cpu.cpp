// fastmeta::bn_relu_pool, bn_relu_pool_backward and bn_relu_pool_double_backward, CPU: the tail of a
// conv block,
//     out = max_pool2d(leaky_relu(batch_norm(x, batch statistics, weight, bias, eps), slope), 2, 2)
// (slope 0: relu), or the same without the pool (pool = false), fused (vec/block_kernels.h). Forward and backward work on the [H, W] planes in memory order (the
// per-channel sums as per-thread partials); the double backward, which only MAML's few support
// images reach, works channel by channel.
//
// dtypes: float32 and float64 (weight/bias of x's dtype), and bfloat16 x with float32 weight/bias
// (what a conv block produces under CPU bf16 autocast, like ATen's mixed-type batch norm): widened
// to float32 in registers, computed in float32, outputs and dx rounded back to bf16 (mean, invstd,
// dweight, dbias in float32).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>

#include <limits>
#include <type_traits>

#include "common.h"
#include "vec/block_kernels.h"

namespace fastmeta::cpu {

namespace {

// The compute type of an input dtype (float for bf16).
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, c10::BFloat16>, float, T>;

at::ScalarType param_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type();
}

void check_channel_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "fastmeta::bn_relu_pool: ", name, " must be [C] = [",
              x.size(1), "], got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == param_dtype(x), "fastmeta::bn_relu_pool: ", name, " must be ", param_dtype(x),
              " for x of dtype ", x.scalar_type(), ", got ", p->scalar_type());
  TORCH_CHECK(p->device().is_cpu(), "fastmeta::bn_relu_pool: ", name, " must be a CPU tensor");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "fastmeta::bn_relu_pool: x must be float32, float64 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "fastmeta::bn_relu_pool: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "fastmeta::bn_relu_pool: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastmeta::bn_relu_pool: x must be contiguous (NCHW) or channels_last (NHWC)");
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1,
              "fastmeta::bn_relu_pool: batch statistics need more than one value per channel, got x ", x.sizes());
}

void check_activation(double slope, const char* op) {
  // slope >= 0 keeps the activation non-decreasing: the pooled maximum is then the activation of the
  // maximum, which is what the window index records.
  TORCH_CHECK(std::isfinite(slope) && slope >= 0.0, "fastmeta::", op,
              ": negative_slope must be a finite float >= 0, got ", slope);
}

// The output's (and idx's) shape: [N, C, H/2, W/2] with the pool, x's without.
void check_pooled(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype, const char* op,
                  bool pool) {
  const int64_t n = x.size(0), c = x.size(1), ho = pool ? x.size(2) / 2 : x.size(2), wo = pool ? x.size(3) / 2 : x.size(3);
  TORCH_CHECK(t.sizes() == at::IntArrayRef({n, c, ho, wo}) && t.scalar_type() == dtype, "fastmeta::", op, ": ", name,
              " must be [", n, ", ", c, ", ", ho, ", ", wo, "] of dtype ", dtype, ", got ", t.sizes(), " ",
              t.scalar_type());
}

// The kernels for storage type S: vec::block_kernels<S> for float/double, the bf16 table (raw
// uint16 bits, float32 compute) for c10::BFloat16.
template <typename S>
struct Planes {
  using A = acc_type<S>;
  static constexpr bool kBf16 = !std::is_same_v<S, A>;
  // The kernel's storage pointer type: S itself, or bf16's raw uint16 bits.
  using R = std::conditional_t<kBf16, uint16_t, S>;
  static const R* raw(const S* p) { return reinterpret_cast<const R*>(p); }
  static R* raw(S* p) { return reinterpret_cast<R*>(p); }
  static const auto& k() {
    if constexpr (kBf16) return vec::block_kernels_bf16();
    else return vec::block_kernels<A>();
  }

  static void stats(const S* x, int64_t n, A shift, double* s1, double* s2) { k().stats(raw(x), n, shift, s1, s2); }
  static void fwd(const S* x, int64_t h, int64_t w, A scale, A shift, A slope, S* out, uint8_t* idx) {
    k().fwd_plane(raw(x), h, w, scale, shift, slope, raw(out), idx);
  }
  static void sums(const S* x, int64_t h, int64_t w, const S* g, const uint8_t* idx, A mean, A slope, double* sdz,
                   double* sdzx) {
    k().bwd_sums(raw(x), h, w, raw(g), idx, mean, slope, sdz, sdzx);
  }
  static void dx(const S* x, int64_t h, int64_t w, const S* g, const uint8_t* idx, A mean, A c1, A c0, A kg, A slope,
                 S* dx) {
    k().dx_plane(raw(x), h, w, raw(g), idx, mean, c1, c0, kg, slope, raw(dx));
  }
  // channels_last: one image per call, per-channel constant arrays
  static void stats_nhwc(const S* x, int64_t positions, int64_t c, const A* shift, double* s1, double* s2) {
    k().stats_nhwc(raw(x), positions, c, shift, s1, s2);
  }
  static void fwd_nhwc(const S* x, int64_t h, int64_t w, int64_t c, const A* scale, const A* shift, A slope, S* out,
                       uint8_t* idx) {
    k().fwd_nhwc(raw(x), h, w, c, scale, shift, slope, raw(out), idx);
  }
  static void sums_nhwc(const S* x, int64_t h, int64_t w, int64_t c, const S* g, const uint8_t* idx, const A* mean,
                        A slope, double* sdz, double* sdzx) {
    k().bwd_sums_nhwc(raw(x), h, w, c, raw(g), idx, mean, slope, sdz, sdzx);
  }
  static void dx_nhwc(const S* x, int64_t h, int64_t w, int64_t c, const S* g, const uint8_t* idx, const A* mean,
                      const A* c1, const A* c0, const A* kg, A slope, S* dx) {
    k().dx_nhwc(raw(x), h, w, c, raw(g), idx, mean, c1, c0, kg, slope, raw(dx));
  }
  // no pool: n elements of one channel, or one channels_last image of positions x c
  static void fwd_flat(const S* x, int64_t n, A scale, A shift, A slope, S* out, uint8_t* idx) {
    k().fwd_flat(raw(x), n, scale, shift, slope, raw(out), idx);
  }
  static void sums_flat(const S* x, int64_t n, const S* g, const uint8_t* idx, A mean, A slope, double* sdz,
                        double* sdzx) {
    k().bwd_sums_flat(raw(x), n, raw(g), idx, mean, slope, sdz, sdzx);
  }
  static void dx_flat(const S* x, int64_t n, const S* g, const uint8_t* idx, A mean, A c1, A c0, A kg, A slope,
                      S* dx) {
    k().dx_flat(raw(x), n, raw(g), idx, mean, c1, c0, kg, slope, raw(dx));
  }
  static void fwd_flat_nhwc(const S* x, int64_t positions, int64_t c, const A* scale, const A* shift, A slope, S* out,
                            uint8_t* idx) {
    k().fwd_flat_nhwc(raw(x), positions, c, scale, shift, slope, raw(out), idx);
  }
  static void sums_flat_nhwc(const S* x, int64_t positions, int64_t c, const S* g, const uint8_t* idx, const A* mean,
                             A slope, double* sdz, double* sdzx) {
    k().bwd_sums_flat_nhwc(raw(x), positions, c, raw(g), idx, mean, slope, sdz, sdzx);
  }
  static void dx_flat_nhwc(const S* x, int64_t positions, int64_t c, const S* g, const uint8_t* idx, const A* mean,
                           const A* c1, const A* c0, const A* kg, A slope, S* dx) {
    k().dx_flat_nhwc(raw(x), positions, c, raw(g), idx, mean, c1, c0, kg, slope, raw(dx));
  }
};

// channels_last (and not also NCHW-contiguous, as a 1-channel or 1x1 tensor is): the NHWC kernels.
bool is_nhwc(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The work items of every pass: the H x W planes of an NCHW tensor (N x C of them, in memory order:
// rather than one channel's N strided planes at a time, which let the prefetchers stream the
// tensor: inside the Conv-4 MAML step the backward of the first block went from 2.2 to 0.9 ms per
// call, the forward from 1.0 to 0.6 ms), or the images of a channels_last one (N). fn(i) handles
// item i; enough items per work chunk that waking a thread pays (common.h: kSerialElements).
template <typename F>
void for_items(const at::Tensor& x, bool nhwc, F fn) {
  const int64_t count = nhwc ? x.size(0) : x.size(0) * x.size(1);
  const int64_t per_item = x.size(2) * x.size(3) * (nhwc ? x.size(1) : 1);
  at::parallel_for(0, count, std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, per_item)),
                   [&](int64_t i0, int64_t i1) {
                     for (int64_t i = i0; i < i1; ++i) fn(i);
                   });
}

// Per-channel sums over the items: fn(i, s1, s2) adds item i's sums into its thread's [C] arrays
// s1, s2 (each thread has its own, added at the end). Returns [2, C]: the s1 totals, then the s2.
template <typename F>
std::vector<double> channel_sums(const at::Tensor& x, bool nhwc, F fn) {
  const int64_t c = x.size(1);
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * c, 0.0);
  for_items(x, nhwc, [&](int64_t i) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * c;
    fn(i, mine, mine + c);
  });
  std::vector<double> total(static_cast<size_t>(2 * c), 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t k = 0; k < 2 * c; ++k) total[k] += partial[static_cast<size_t>(t) * 2 * c + k];
  return total;
}

#define FASTMETA_DISPATCH_BLOCK(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    double negative_slope, bool pool) {
  check_x(x);
  check_channel_param(weight, "weight", x);
  check_channel_param(bias, "bias", x);
  check_activation(negative_slope, "bn_relu_pool");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = pool ? h / 2 : h, wo = pool ? w / 2 : w, hw = h * w, howo = ho * wo;
  const bool nhwc = is_nhwc(x);
  const auto layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({n, c, ho, wo}, x.options().memory_format(layout));
  at::Tensor idx = at::empty({n, c, ho, wo}, x.options().dtype(at::kByte).memory_format(layout));
  at::Tensor mean = at::empty({c}, x.options().dtype(param_dtype(x)));
  at::Tensor invstd = at::empty({c}, x.options().dtype(param_dtype(x)));
  FASTMETA_DISPATCH_BLOCK(x.scalar_type(), "bn_relu_pool_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    using K = Planes<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    const acc_t* wp = wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = bc.defined() ? bc.const_data_ptr<acc_t>() : nullptr;
    // Statistics shifted by the channel's first element (near its mean), in one pass.
    std::vector<acc_t> shift0(c);
    for (int64_t ch = 0; ch < c; ++ch) shift0[ch] = static_cast<acc_t>(xp[nhwc ? ch : ch * hw]);  // x[0, ch, 0, 0]
    const std::vector<double> sums = channel_sums(x, nhwc, [&](int64_t i, double* s1, double* s2) {
      if (nhwc) {
        K::stats_nhwc(xp + i * hw * c, hw, c, shift0.data(), s1, s2);
      } else {
        const int64_t ch = i % c;
        K::stats(xp + i * hw, hw, shift0[ch], s1 + ch, s2 + ch);
      }
    });
    const double count = static_cast<double>(n * hw);
    std::vector<acc_t> scale(c), shift(c);
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* sp = invstd.mutable_data_ptr<acc_t>();
    for (int64_t ch = 0; ch < c; ++ch) {
      const double s1 = sums[ch], s2 = sums[c + ch];
      const double m = static_cast<double>(shift0[ch]) + s1 / count;
      const double var = std::max(0.0, (s2 - s1 * s1 / count) / count);
      const double is = 1.0 / std::sqrt(var + eps);
      const double gamma = wp ? static_cast<double>(wp[ch]) : 1.0, beta = bp ? static_cast<double>(bp[ch]) : 0.0;
      // z = x * scale + shift, as ATen's batch-norm transform computes it.
      scale[ch] = static_cast<acc_t>(gamma * is);
      shift[ch] = static_cast<acc_t>(beta - m * gamma * is);
      mp[ch] = static_cast<acc_t>(m);
      sp[ch] = static_cast<acc_t>(is);
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ip = idx.mutable_data_ptr<uint8_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    for_items(x, nhwc, [&](int64_t i) {
      if (!pool && nhwc)
        K::fwd_flat_nhwc(xp + i * hw * c, hw, c, scale.data(), shift.data(), slope, op + i * hw * c, ip + i * hw * c);
      else if (!pool)
        K::fwd_flat(xp + i * hw, hw, scale[i % c], shift[i % c], slope, op + i * hw, ip + i * hw);
      else if (nhwc)
        K::fwd_nhwc(xp + i * hw * c, h, w, c, scale.data(), shift.data(), slope, op + i * howo * c, ip + i * howo * c);
      else
        K::fwd(xp + i * hw, h, w, scale[i % c], shift[i % c], slope, op + i * howo, ip + i * howo);
    });
    // Without the pool, non-finite statistics propagate as NaN element by element (as in ATen).
    if (pool && nhwc) {
      // The NCHW plane kernel NaN-fills a channel whose statistics are not finite (as ATen's
      // output is then); the NHWC kernel does not test per element, so it is done here.
      for (int64_t ch = 0; ch < c; ++ch) {
        if (std::isfinite(static_cast<double>(scale[ch])) && std::isfinite(static_cast<double>(shift[ch]))) continue;
        for (int64_t q = 0; q < n * howo; ++q) {
          op[q * c + ch] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
          ip[q * c + ch] = 4;
        }
      }
    }
  });
  return {out, idx, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& idx_in, double negative_slope, bool pool) {
  check_x(x);
  check_channel_param(weight, "weight", x);
  check_activation(negative_slope, "bn_relu_pool_backward");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = pool ? h / 2 : h, wo = pool ? w / 2 : w, hw = h * w, howo = ho * wo;
  check_pooled(grad_out_in, "grad_out", x, x.scalar_type(), "bn_relu_pool_backward", pool);
  check_pooled(idx_in, "idx", x, at::kByte, "bn_relu_pool_backward", pool);
  TORCH_CHECK(mean.numel() == c && invstd.numel() == c, "fastmeta::bn_relu_pool_backward: mean and invstd must be [C]");
  const bool nhwc = is_nhwc(x);
  const auto layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor g = grad_out_in.contiguous(layout);
  const at::Tensor idx = idx_in.contiguous(layout);
  at::Tensor dx = at::empty_like(x, x.options(), layout);
  at::Tensor dw = at::empty({c}, x.options().dtype(param_dtype(x)));
  at::Tensor db = at::empty({c}, x.options().dtype(param_dtype(x)));
  FASTMETA_DISPATCH_BLOCK(x.scalar_type(), "bn_relu_pool_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    using K = Planes<scalar_t>;
    const at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
    const acc_t* wp = wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr;
    const at::Tensor mc = mean.to(at::kDouble).contiguous(), sc = invstd.to(at::kDouble).contiguous();
    const double* mp = mc.const_data_ptr<double>();
    const double* sp = sc.const_data_ptr<double>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<acc_t> mean_t(c);
    for (int64_t ch = 0; ch < c; ++ch) mean_t[ch] = static_cast<acc_t>(mp[ch]);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const std::vector<double> sums = channel_sums(x, nhwc, [&](int64_t i, double* sdz, double* sdzx) {
      if (!pool && nhwc) {
        K::sums_flat_nhwc(xp + i * hw * c, hw, c, gp + i * hw * c, ip + i * hw * c, mean_t.data(), slope, sdz, sdzx);
      } else if (!pool) {
        const int64_t ch = i % c;
        K::sums_flat(xp + i * hw, hw, gp + i * hw, ip + i * hw, mean_t[ch], slope, sdz + ch, sdzx + ch);
      } else if (nhwc) {
        K::sums_nhwc(xp + i * hw * c, h, w, c, gp + i * howo * c, ip + i * howo * c, mean_t.data(), slope, sdz, sdzx);
      } else {
        const int64_t ch = i % c;
        K::sums(xp + i * hw, h, w, gp + i * howo, ip + i * howo, mean_t[ch], slope, sdz + ch, sdzx + ch);
      }
    });
    const double count = static_cast<double>(n * hw);
    std::vector<acc_t> c1(c), c0(c), kg(c);
    acc_t* dwp = dw.mutable_data_ptr<acc_t>();
    acc_t* dbp = db.mutable_data_ptr<acc_t>();
    for (int64_t ch = 0; ch < c; ++ch) {
      const double s = sp[ch], sdz = sums[ch], sdz_xhat = sums[c + ch] * s;
      const double k_ch = (wp ? static_cast<double>(wp[ch]) : 1.0) * s;
      dbp[ch] = static_cast<acc_t>(sdz);
      dwp[ch] = static_cast<acc_t>(sdz_xhat);
      // dx = k dz + c0 + c1 (x - mean); (x - mean) before the multiply, so a large mean does not cancel.
      c1[ch] = static_cast<acc_t>(-k_ch * s * sdz_xhat / count);
      c0[ch] = static_cast<acc_t>(-k_ch * sdz / count);
      kg[ch] = static_cast<acc_t>(k_ch);
    }
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    for_items(x, nhwc, [&](int64_t i) {
      if (!pool && nhwc) {
        K::dx_flat_nhwc(xp + i * hw * c, hw, c, gp + i * hw * c, ip + i * hw * c, mean_t.data(), c1.data(), c0.data(),
                        kg.data(), slope, dxp + i * hw * c);
      } else if (!pool) {
        const int64_t ch = i % c;
        K::dx_flat(xp + i * hw, hw, gp + i * hw, ip + i * hw, mean_t[ch], c1[ch], c0[ch], kg[ch], slope, dxp + i * hw);
      } else if (nhwc) {
        K::dx_nhwc(xp + i * hw * c, h, w, c, gp + i * howo * c, ip + i * howo * c, mean_t.data(), c1.data(), c0.data(),
                   kg.data(), slope, dxp + i * hw * c);
      } else {
        const int64_t ch = i % c;
        K::dx(xp + i * hw, h, w, gp + i * howo, ip + i * howo, mean_t[ch], c1[ch], c0[ch], kg[ch], slope,
              dxp + i * hw);
      }
    });
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cpu(
    const std::optional<at::Tensor>& ggx_in, const std::optional<at::Tensor>& ggw_in,
    const std::optional<at::Tensor>& ggb_in, const at::Tensor& grad_out_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& idx_in, double negative_slope, bool pool) {
  check_x(x_in);
  check_channel_param(weight, "weight", x_in);
  check_channel_param(ggw_in, "ggw", x_in);
  check_channel_param(ggb_in, "ggb", x_in);
  check_activation(negative_slope, "bn_relu_pool_double_backward");
  check_pooled(grad_out_in, "grad_out", x_in, x_in.scalar_type(), "bn_relu_pool_double_backward", pool);
  check_pooled(idx_in, "idx", x_in, at::kByte, "bn_relu_pool_double_backward", pool);
  const int64_t c = x_in.size(1);
  TORCH_CHECK(mean.numel() == c && invstd.numel() == c,
              "fastmeta::bn_relu_pool_double_backward: mean and invstd must be [C]");
  if (ggx_in.has_value())
    TORCH_CHECK(ggx_in->sizes() == x_in.sizes() && ggx_in->scalar_type() == x_in.scalar_type(),
                "fastmeta::bn_relu_pool_double_backward: ggx must have x's shape and dtype, got ", ggx_in->sizes(), " ",
                ggx_in->scalar_type());
  // Only the create_graph path (a few support images per task) gets here: bf16 inputs are widened
  // to float32 whole, computed, and the results rounded back.
  const at::ScalarType acc = param_dtype(x_in);
  const at::Tensor x = x_in.to(acc).contiguous();
  const at::Tensor g = grad_out_in.to(acc).contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const at::Tensor ggx = ggx_in.has_value() ? ggx_in->to(acc).contiguous() : at::Tensor();
  const at::Tensor ggw = ggw_in.has_value() ? ggw_in->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor ggb = ggb_in.has_value() ? ggb_in->to(at::kDouble).contiguous() : at::Tensor();
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t ho = pool ? h / 2 : h, wo = pool ? w / 2 : w;
  at::Tensor g_grad_out = at::empty_like(g);
  at::Tensor g_x = at::empty_like(x);
  at::Tensor g_w = at::empty({c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_double_backward_cpu", [&] {
    const auto& k = vec::block_kernels<scalar_t>();
    const at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
    const scalar_t* wp = wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr;
    const at::Tensor mc = mean.to(at::kDouble).contiguous(), sc = invstd.to(at::kDouble).contiguous();
    const double* mp = mc.const_data_ptr<double>();
    const double* sp = sc.const_data_ptr<double>();
    const double* gwp = ggw.defined() ? ggw.const_data_ptr<double>() : nullptr;
    const double* gbp = ggb.defined() ? ggb.const_data_ptr<double>() : nullptr;
    const scalar_t* ap = ggx.defined() ? ggx.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* ggop = g_grad_out.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = g_x.mutable_data_ptr<scalar_t>();
    scalar_t* gwo = g_w.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, n * h * w));
    at::parallel_for(0, c, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        double g_gamma = 0.0;
        k.bwd2(ap ? ap + ch * h * w : nullptr, gwp ? gwp[ch] : 0.0, gbp ? gbp[ch] : 0.0, gp + ch * ho * wo,
               ip + ch * ho * wo, c * ho * wo, xp + ch * h * w, n, c * h * w, h, w, wp ? wp[ch] : scalar_t(1), mp[ch],
               sp[ch], negative_slope, pool, ggop + ch * ho * wo, gxp + ch * h * w, &g_gamma);
        gwo[ch] = static_cast<scalar_t>(g_gamma);
      }
    });
  });
  return {g_grad_out.to(x_in.scalar_type()), g_x.to(x_in.scalar_type()), g_w};
}

}  // namespace fastmeta::cpu
