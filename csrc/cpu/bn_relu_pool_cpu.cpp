// fastmeta::bn_relu_pool, bn_relu_pool_backward and bn_relu_pool_double_backward, CPU: the tail of a
// conv block,
//     out = max_pool2d(relu(batch_norm(x, batch statistics, weight, bias, eps)), 2, 2),
// fused (vec/block_kernels.h). Forward and backward work on the [H, W] planes in memory order (the
// per-channel sums as per-thread partials); the double backward, which only MAML's few support
// images reach, works channel by channel.
//
// dtypes: float32 and float64 (weight/bias of x's dtype), and bfloat16 x with float32 weight/bias
// (what a conv block produces under CPU bf16 autocast, like ATen's mixed-type batch norm): each
// bf16 plane is widened into an L1-sized float buffer, computed in float, and rounded back (outputs
// and dx in bf16; mean, invstd, dweight, dbias in float32).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>

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
  TORCH_CHECK(x.is_contiguous(), "fastmeta::bn_relu_pool: x must be contiguous (NCHW)");
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1,
              "fastmeta::bn_relu_pool: batch statistics need more than one value per channel, got x ", x.sizes());
}

void check_pooled(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype, const char* op) {
  const int64_t n = x.size(0), c = x.size(1), ho = x.size(2) / 2, wo = x.size(3) / 2;
  TORCH_CHECK(t.sizes() == at::IntArrayRef({n, c, ho, wo}) && t.scalar_type() == dtype, "fastmeta::", op, ": ", name,
              " must be [", n, ", ", c, ", ", ho, ", ", wo, "] of dtype ", dtype, ", got ", t.sizes(), " ",
              t.scalar_type());
}

// Planes per work item: enough elements that waking a thread pays (common.h: kSerialElements).
int64_t plane_grain(const at::Tensor& x) {
  return std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, x.size(2) * x.size(3)));
}

// A plane of T as a pointer to its compute type: itself, or widened into `buf` for bf16.
template <typename T>
const acc_type<T>* widen(const T* p, int64_t n, std::vector<acc_type<T>>& buf) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return p;
  } else {
    buf.resize(static_cast<size_t>(n));
    vec::bf16_kernels().widen(reinterpret_cast<const uint16_t*>(p), buf.data(), n);
    return buf.data();
  }
}

// Where to compute a plane that ends in `out`: `out` itself, or `buf` (then narrowed by `narrow`).
template <typename T>
acc_type<T>* target(T* out, int64_t n, std::vector<acc_type<T>>& buf) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return out;
  } else {
    buf.resize(static_cast<size_t>(n));
    return buf.data();
  }
}

template <typename T>
void narrow(const acc_type<T>* src, T* out, int64_t n) {
  if constexpr (!std::is_same_v<T, acc_type<T>>)
    vec::bf16_kernels().narrow(src, reinterpret_cast<uint16_t*>(out), n);  // round to nearest even
}

// Per-channel sums over all N x C planes in memory order: each thread adds its planes into its own
// row of `partial` ([threads, C, 2]); the rows are added at the end. Memory order (rather than one
// channel's N strided planes at a time) lets the prefetchers stream the tensor: inside the Conv-4
// MAML step the backward of the first block went from 2.2 to 0.9 ms per call, the forward from 1.0
// to 0.6 ms. plane_fn(p, ch, s1, s2, scratch) handles plane p of channel ch.
template <typename Scratch, typename F>
std::vector<double> channel_sums(const at::Tensor& x, F plane_fn) {
  const int64_t n = x.size(0), c = x.size(1);
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * c * 2, 0.0);
  at::parallel_for(0, n * c, plane_grain(x), [&](int64_t p0, int64_t p1) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * c * 2;
    Scratch scratch;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t ch = p % c;
      plane_fn(p, ch, mine + 2 * ch, mine + 2 * ch + 1, scratch);
    }
  });
  std::vector<double> total(static_cast<size_t>(c) * 2, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < 2 * c; ++i) total[i] += partial[static_cast<size_t>(t) * c * 2 + i];
  return total;
}

template <typename A>
struct Buffers {
  std::vector<A> x, g, out;
};

#define FASTMETA_DISPATCH_BLOCK(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_x(x);
  check_channel_param(weight, "weight", x);
  check_channel_param(bias, "bias", x);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = h / 2, wo = w / 2, hw = h * w, howo = ho * wo;
  at::Tensor out = at::empty({n, c, ho, wo}, x.options());
  at::Tensor idx = at::empty({n, c, ho, wo}, x.options().dtype(at::kByte));
  at::Tensor mean = at::empty({c}, x.options().dtype(param_dtype(x)));
  at::Tensor invstd = at::empty({c}, x.options().dtype(param_dtype(x)));
  FASTMETA_DISPATCH_BLOCK(x.scalar_type(), "bn_relu_pool_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto& k = vec::block_kernels<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    const acc_t* wp = wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = bc.defined() ? bc.const_data_ptr<acc_t>() : nullptr;
    // Statistics shifted by the channel's first element (near its mean), in one pass.
    std::vector<acc_t> shift0(c);
    for (int64_t ch = 0; ch < c; ++ch) shift0[ch] = static_cast<acc_t>(xp[ch * hw]);
    const std::vector<double> sums = channel_sums<Buffers<acc_t>>(
        x, [&](int64_t p, int64_t ch, double* s1, double* s2, Buffers<acc_t>& b) {
          k.stats(widen(xp + p * hw, hw, b.x), hw, shift0[ch], s1, s2);
        });
    const double count = static_cast<double>(n * hw);
    std::vector<acc_t> scale(c), shift(c);
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* sp = invstd.mutable_data_ptr<acc_t>();
    for (int64_t ch = 0; ch < c; ++ch) {
      const double s1 = sums[2 * ch], s2 = sums[2 * ch + 1];
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
    at::parallel_for(0, n * c, plane_grain(x), [&](int64_t p0, int64_t p1) {
      Buffers<acc_t> b;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ch = p % c;
        acc_t* o = target(op + p * howo, howo, b.out);
        k.fwd_plane(widen(xp + p * hw, hw, b.x), h, w, scale[ch], shift[ch], o, ip + p * howo);
        narrow(o, op + p * howo, howo);
      }
    });
  });
  return {out, idx, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& idx_in) {
  check_x(x);
  check_channel_param(weight, "weight", x);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = h / 2, wo = w / 2, hw = h * w, howo = ho * wo;
  check_pooled(grad_out_in, "grad_out", x, x.scalar_type(), "bn_relu_pool_backward");
  check_pooled(idx_in, "idx", x, at::kByte, "bn_relu_pool_backward");
  TORCH_CHECK(mean.numel() == c && invstd.numel() == c, "fastmeta::bn_relu_pool_backward: mean and invstd must be [C]");
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({c}, x.options().dtype(param_dtype(x)));
  at::Tensor db = at::empty({c}, x.options().dtype(param_dtype(x)));
  FASTMETA_DISPATCH_BLOCK(x.scalar_type(), "bn_relu_pool_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto& k = vec::block_kernels<acc_t>();
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
    const std::vector<double> sums = channel_sums<Buffers<acc_t>>(
        x, [&](int64_t p, int64_t ch, double* sdz, double* sdzx, Buffers<acc_t>& b) {
          k.bwd_sums(widen(xp + p * hw, hw, b.x), h, w, widen(gp + p * howo, howo, b.g), ip + p * howo, mean_t[ch], sdz,
                     sdzx);
        });
    const double count = static_cast<double>(n * hw);
    std::vector<acc_t> c1(c), c0(c), kg(c);
    acc_t* dwp = dw.mutable_data_ptr<acc_t>();
    acc_t* dbp = db.mutable_data_ptr<acc_t>();
    for (int64_t ch = 0; ch < c; ++ch) {
      const double s = sp[ch], sdz = sums[2 * ch], sdz_xhat = sums[2 * ch + 1] * s;
      const double k_ch = (wp ? static_cast<double>(wp[ch]) : 1.0) * s;
      dbp[ch] = static_cast<acc_t>(sdz);
      dwp[ch] = static_cast<acc_t>(sdz_xhat);
      // dx = k dz + c0 + c1 (x - mean); (x - mean) before the multiply, so a large mean does not cancel.
      c1[ch] = static_cast<acc_t>(-k_ch * s * sdz_xhat / count);
      c0[ch] = static_cast<acc_t>(-k_ch * sdz / count);
      kg[ch] = static_cast<acc_t>(k_ch);
    }
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, plane_grain(x), [&](int64_t p0, int64_t p1) {
      Buffers<acc_t> b;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ch = p % c;
        acc_t* d = target(dxp + p * hw, hw, b.out);
        k.dx_plane(widen(xp + p * hw, hw, b.x), h, w, widen(gp + p * howo, howo, b.g), ip + p * howo, mean_t[ch],
                   c1[ch], c0[ch], kg[ch], d);
        narrow(d, dxp + p * hw, hw);
      }
    });
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cpu(
    const std::optional<at::Tensor>& ggx_in, const std::optional<at::Tensor>& ggw_in,
    const std::optional<at::Tensor>& ggb_in, const at::Tensor& grad_out_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& idx_in) {
  check_x(x_in);
  check_channel_param(weight, "weight", x_in);
  check_channel_param(ggw_in, "ggw", x_in);
  check_channel_param(ggb_in, "ggb", x_in);
  check_pooled(grad_out_in, "grad_out", x_in, x_in.scalar_type(), "bn_relu_pool_double_backward");
  check_pooled(idx_in, "idx", x_in, at::kByte, "bn_relu_pool_double_backward");
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
  const int64_t ho = h / 2, wo = w / 2;
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
               sp[ch], ggop + ch * ho * wo, gxp + ch * h * w, &g_gamma);
        gwo[ch] = static_cast<scalar_t>(g_gamma);
      }
    });
  });
  return {g_grad_out.to(x_in.scalar_type()), g_x.to(x_in.scalar_type()), g_w};
}

}  // namespace fastmeta::cpu
