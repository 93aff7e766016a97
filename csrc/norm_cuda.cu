// Torch glue of the CUDA kernels (norm_cuda_kernels.cuh); compiled only when torch has CUDA
// and nvcc is found (lrp_kernels/_cpp.py).  Same contract as the CPU path (norm.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "norm.h"
#include "norm_cuda_kernels.cuh"

namespace lrp::cuda {
namespace {

namespace K = lrp::cuda_kernels;

// at:: storage types -> CUDA's own (identical layout)
template <typename T> struct Native { using type = T; };
template <> struct Native<at::Half> { using type = __half; };
template <> struct Native<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
typename Native<T>::type* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Native<T>::type*>(t.data_ptr<T>());
}

int64_t rows_of(const at::Tensor& x) {
  const int64_t H = x.size(-1);
  return H == 0 ? 0 : x.numel() / H;
}

at::Tensor stat_tensor(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type(x.scalar_type())));
}

at::Tensor param_or(const OptTensor& p, const at::Tensor& x, double fill) {
  const auto acc = acc_type(x.scalar_type());
  at::Tensor t = param_as(p, acc);
  return t.defined() ? t : at::full({x.size(-1)}, fill, x.options().dtype(acc));
}

#define LRP_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const OptTensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = param_or(weight, x, 1.0);
  at::Tensor y = at::empty(x.sizes(), x.options()), rstd = stat_tensor(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LRP_DISPATCH(x.scalar_type(), "lrp_rms_norm_forward_cuda", [&] {
    using A = acc_t_of<scalar_t>;
    C10_CUDA_CHECK(K::rms_forward(ptr<scalar_t>(x), w.data_ptr<A>(), ptr<scalar_t>(y), rstd.data_ptr<A>(),
                                  rows_of(x), x.size(-1), eps, stream));
  });
  return {y, rstd};
}

at::Tensor rms_norm_backward(const at::Tensor& grad_y, const OptTensor& weight, const at::Tensor& rstd_in) {
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor w = param_or(weight, g, 1.0);
  const at::Tensor rstd = rstd_in.to(acc_type(g.scalar_type())).contiguous();
  TORCH_CHECK(rstd.numel() == rows_of(g), "rstd must have one value per row of grad_y");
  at::Tensor out = at::empty(g.sizes(), g.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  LRP_DISPATCH(g.scalar_type(), "lrp_rms_norm_backward_cuda", [&] {
    using A = acc_t_of<scalar_t>;
    C10_CUDA_CHECK(K::rms_backward(ptr<scalar_t>(g), w.data_ptr<A>(), rstd.data_ptr<A>(), ptr<scalar_t>(out),
                                   rows_of(g), g.size(-1), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x_in, const OptTensor& weight,
                                                                  const OptTensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = param_or(weight, x, 1.0), b = param_or(bias, x, 0.0);
  at::Tensor y = at::empty(x.sizes(), x.options()), mean = stat_tensor(x), rstd = stat_tensor(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LRP_DISPATCH(x.scalar_type(), "lrp_layer_norm_forward_cuda", [&] {
    using A = acc_t_of<scalar_t>;
    C10_CUDA_CHECK(K::ln_forward(ptr<scalar_t>(x), w.data_ptr<A>(), b.data_ptr<A>(), ptr<scalar_t>(y),
                                 mean.data_ptr<A>(), rstd.data_ptr<A>(), rows_of(x), x.size(-1), eps, stream));
  });
  return {y, mean, rstd};
}

at::Tensor layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x_in, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
                               double epsilon, bool relevance) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_y.to(x.scalar_type()).contiguous();
  TORCH_CHECK(g.sizes() == x.sizes(), "grad_y must have x's shape");
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w = param_or(weight, x, 1.0), b = param_or(bias, x, 0.0);
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  TORCH_CHECK(mean.numel() == rows_of(x) && rstd.numel() == rows_of(x),
              "mean and rstd must have one value per row of x");
  at::Tensor out = at::empty(x.sizes(), x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  LRP_DISPATCH(x.scalar_type(), "lrp_layer_norm_backward_cuda", [&] {
    using A = acc_t_of<scalar_t>;
    C10_CUDA_CHECK(K::ln_backward(ptr<scalar_t>(g), ptr<scalar_t>(x), w.data_ptr<A>(), b.data_ptr<A>(),
                                  mean.data_ptr<A>(), rstd.data_ptr<A>(), ptr<scalar_t>(out), rows_of(x),
                                  x.size(-1), epsilon, relevance, stream));
  });
  return out;
}

}  // namespace lrp::cuda
