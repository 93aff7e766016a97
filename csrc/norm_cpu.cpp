// CPU kernels of RMSNorm-identity and LayerNorm (math: norm.h, SPEC.md).
//
// One parallel task per block of rows (at::parallel_for, i.e. torch's OpenMP pool); inside a
// row every loop is a flat `omp simd` loop over contiguous memory that the compiler turns into
// vector code, including the bf16/fp16 <-> float conversions (written as bit operations / the
// native _Float16 type for that reason).  A row is re-read from cache, never from memory, so
// each kernel makes one pass over its inputs in memory.
#include "norm.h"
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace lrp::cpu {
namespace {

// ---- kernels (w and b are always present: the binding passes ones / zeros) ----------------
template <typename T, typename A = acc_t<T>>
void rms_forward(const T* x, const A* w, T* y, A* rstd, int64_t rows, int64_t H, A eps) {
  at::parallel_for(0, rows, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * H;
      T* yr = y == nullptr ? nullptr : y + r * H;
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        const A v = load<A>(xr[i]);
        ss += v * v;
      }
      const A rs = A(1) / std::sqrt(ss / A(H) + eps);
      rstd[r] = rs;
      if (y == nullptr) continue;  // statistics only (the module's own forward gives y)
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) yr[i] = store<T>(load<A>(xr[i]) * rs * w[i]);
    }
  });
}

template <typename T, typename A = acc_t<T>>
void rms_backward(const T* gy, const A* w, const A* rstd, T* gx, int64_t rows, int64_t H) {
  at::parallel_for(0, rows, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gr = gy + r * H;
      T* outr = gx + r * H;
      const A rs = rstd[r];
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) outr[i] = store<T>(load<A>(gr[i]) * rs * w[i]);
    }
  });
}

template <typename T, typename A = acc_t<T>>
void ln_forward(const T* x, const A* w, const A* b, T* y, A* mean, A* rstd, int64_t rows, int64_t H,
                A eps) {
  at::parallel_for(0, rows, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * H;
      T* yr = y + r * H;
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < H; ++i) s += load<A>(xr[i]);
      const A mu = s / A(H);
      A ss = 0;  // two-pass variance: exact centring, no cancellation
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        const A c = load<A>(xr[i]) - mu;
        ss += c * c;
      }
      const A rs = A(1) / std::sqrt(ss / A(H) + eps);
      mean[r] = mu;
      rstd[r] = rs;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) yr[i] = store<T>((load<A>(xr[i]) - mu) * rs * w[i] + b[i]);
    }
  });
}

template <typename T, typename A = acc_t<T>>
void ln_backward_grad(const T* gy, const A* w, const A* rstd, T* gx, int64_t rows, int64_t H) {
  at::parallel_for(0, rows, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gr = gy + r * H;
      T* outr = gx + r * H;
      const A rs = rstd[r];
      A su = 0;
#pragma omp simd reduction(+ : su)
      for (int64_t i = 0; i < H; ++i) su += load<A>(gr[i]) * rs * w[i];
      const A mu = su / A(H);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) outr[i] = store<T>(load<A>(gr[i]) * rs * w[i] - mu);
    }
  });
}

template <typename T, typename A = acc_t<T>>
void ln_backward_relevance(const T* ry, const T* x, const A* w, const A* b, const A* mean,
                           const A* rstd, T* rx, int64_t rows, int64_t H, A epsilon) {
  at::parallel_for(0, rows, grain(H), [&](int64_t begin, int64_t end) {
    std::vector<A> n(H);  // n = R_c / stab(c), needed twice: computed once (two divisions)
    for (int64_t r = begin; r < end; ++r) {
      const T* rr = ry + r * H;
      const T* xr = x + r * H;
      T* outr = rx + r * H;
      const A mu = mean[r], rs = rstd[r];
      A* nr = n.data();
      A sn = 0;
#pragma omp simd reduction(+ : sn)
      for (int64_t i = 0; i < H; ++i) {
        const A c = load<A>(xr[i]) - mu;
        const A yb = c * rs * w[i];  // y - b
        const A r_c = yb * load<A>(rr[i]) / stab(yb + b[i], epsilon);
        const A v = r_c / stab(c, epsilon);
        nr[i] = v;
        sn += v;
      }
      const A mn = sn / A(H);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) outr[i] = store<T>(load<A>(xr[i]) * (nr[i] - mn));
    }
  });
}

// ---- tensor plumbing ------------------------------------------------------------------------
int64_t rows_of(const at::Tensor& x) {
  const int64_t H = x.size(-1);
  return H == 0 ? 0 : x.numel() / H;
}

at::Tensor stat_tensor(const at::Tensor& x) {  // shape x.shape[:-1], accumulation dtype
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type(x.scalar_type())));
}

at::Tensor param_or(const OptTensor& p, int64_t H, double fill, at::ScalarType acc) {
  at::Tensor t = param_as(p, acc);
  return t.defined() ? t : at::full({H}, fill, at::TensorOptions().dtype(acc));
}

#define LRP_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const OptTensor& weight,
                                                    double eps) {
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-1), rows = rows_of(x);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w = param_or(weight, H, 1.0, acc);
  at::Tensor y = empty_output(x);
  at::Tensor rstd = stat_tensor(x);
  LRP_DISPATCH(x.scalar_type(), "lrp_rms_norm_forward", [&] {
    using A = acc_t<scalar_t>;
    rms_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<A>(), y.data_ptr<scalar_t>(),
                          rstd.data_ptr<A>(), rows, H, static_cast<A>(eps));
  });
  return {y, rstd};
}

at::Tensor rms_norm_rstd(const at::Tensor& x_in, double eps) {
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-1), rows = rows_of(x);
  const at::Tensor w = param_or(std::nullopt, H, 1.0, acc_type(x.scalar_type()));
  at::Tensor rstd = stat_tensor(x);
  LRP_DISPATCH(x.scalar_type(), "lrp_rms_norm_rstd", [&] {
    using A = acc_t<scalar_t>;
    rms_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<A>(), nullptr, rstd.data_ptr<A>(), rows, H,
                          static_cast<A>(eps));
  });
  return rstd;
}

at::Tensor rms_norm_backward(const at::Tensor& grad_y, const OptTensor& weight, const at::Tensor& rstd_in) {
  const at::Tensor g = grad_y.contiguous();
  const int64_t H = g.size(-1), rows = rows_of(g);
  const auto acc = acc_type(g.scalar_type());
  const at::Tensor w = param_or(weight, H, 1.0, acc);
  const at::Tensor rstd = rstd_in.to(acc).contiguous();
  TORCH_CHECK(rstd.numel() == rows, "rstd must have one value per row of grad_y (", rows, "), got ",
              rstd.numel());
  at::Tensor out = empty_output(g);
  LRP_DISPATCH(g.scalar_type(), "lrp_rms_norm_backward", [&] {
    using A = acc_t<scalar_t>;
    rms_backward<scalar_t>(g.data_ptr<scalar_t>(), w.data_ptr<A>(), rstd.data_ptr<A>(),
                           out.data_ptr<scalar_t>(), rows, H);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x_in, const OptTensor& weight,
                                                                  const OptTensor& bias, double eps) {
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-1), rows = rows_of(x);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w = param_or(weight, H, 1.0, acc), b = param_or(bias, H, 0.0, acc);
  at::Tensor y = empty_output(x);
  at::Tensor mean = stat_tensor(x), rstd = stat_tensor(x);
  LRP_DISPATCH(x.scalar_type(), "lrp_layer_norm_forward", [&] {
    using A = acc_t<scalar_t>;
    ln_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<A>(), b.data_ptr<A>(), y.data_ptr<scalar_t>(),
                         mean.data_ptr<A>(), rstd.data_ptr<A>(), rows, H, static_cast<A>(eps));
  });
  return {y, mean, rstd};
}

at::Tensor layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x_in, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
                               double epsilon, bool relevance) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_y.to(x.scalar_type()).contiguous();  // output has x's dtype anyway
  const int64_t H = x.size(-1), rows = rows_of(x);
  TORCH_CHECK(g.sizes() == x.sizes(), "grad_y must have x's shape ", x.sizes(), ", got ", g.sizes());
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w = param_or(weight, H, 1.0, acc), b = param_or(bias, H, 0.0, acc);
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows,
              "mean and rstd must have one value per row of x (", rows, ")");
  at::Tensor out = empty_output(x);
  LRP_DISPATCH(x.scalar_type(), "lrp_layer_norm_backward", [&] {
    using A = acc_t<scalar_t>;
    if (relevance) {
      ln_backward_relevance<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<A>(),
                                      b.data_ptr<A>(), mean.data_ptr<A>(), rstd.data_ptr<A>(),
                                      out.data_ptr<scalar_t>(), rows, H, static_cast<A>(epsilon));
    } else {
      ln_backward_grad<scalar_t>(g.data_ptr<scalar_t>(), w.data_ptr<A>(), rstd.data_ptr<A>(),
                                 out.data_ptr<scalar_t>(), rows, H);
    }
  });
  return out;
}

}  // namespace lrp::cpu
