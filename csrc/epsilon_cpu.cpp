// CPU kernels of the epsilon rule's gradient view (math: epsilon.h). Flat `omp simd` loops over
// contiguous memory inside at::parallel_for blocks: one read and one write per element, where
// the PyTorch fallback makes four passes for the factor and three for its application.
#include "epsilon.h"
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace lrp::cpu {
namespace {

template <typename T, typename A = acc_t<T>>
void factor_kernel(const T* z, T* q, int64_t n, A eps) {
  at::parallel_for(0, n, grain(1), [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) q[i] = store<T>(eps / (std::abs(load<A>(z[i])) + eps));
  });
}

template <typename G, typename Q, typename A = acc_t<G>>
void apply_kernel(const G* g, const Q* q, G* out, int64_t n, A inv_share) {
  at::parallel_for(0, n, grain(1), [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i)
      out[i] = store<G>(load<A>(g[i]) * (A(1) - static_cast<A>(load<acc_t<Q>>(q[i]))) * inv_share);
  });
}

#define LRP_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace

at::Tensor epsilon_factor(const at::Tensor& z_in, double eps) {
  const at::Tensor z = z_in.contiguous();
  at::Tensor q = empty_output(z);
  LRP_DISPATCH(z.scalar_type(), "lrp_epsilon_factor", [&] {
    using A = acc_t<scalar_t>;
    factor_kernel<scalar_t>(z.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), z.numel(), static_cast<A>(eps));
  });
  return q;
}

at::Tensor epsilon_output_backward(const at::Tensor& grad_in, const at::Tensor& q_in, double share) {
  const at::Tensor g = grad_in.contiguous(), q = q_in.contiguous();
  at::Tensor out = empty_output(g);
  LRP_DISPATCH(g.scalar_type(), "lrp_epsilon_output_backward", [&] {
    using G = scalar_t;
    using A = acc_t<G>;
    const A inv_share = static_cast<A>(1.0 / share);
    // the factor keeps its producer's dtype, which may differ from the gradient's
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "lrp_epsilon_factor_dtype", [&] {
      apply_kernel<G, scalar_t>(g.data_ptr<G>(), q.data_ptr<scalar_t>(), out.data_ptr<G>(), g.numel(), inv_share);
    });
  });
  return out;
}

}  // namespace lrp::cpu
