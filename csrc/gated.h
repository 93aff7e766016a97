// The gated product's backward, gradient view (SPEC.md: identity rule on the activation, uniform
// rule on the product), optionally with the epsilon rule of the two linears that produced g and u.
//
//   m = act(g) * u,   s = act(g),   h = G_m * k   (k = 1/2 when both inputs get a gradient)
//   G_u = h * s              * fu,    fu = |u| / (|u| + eps_p)   (u / stab(u) of u's epsilon linear)
//   G_g = h * u * s / stab(g) * fg,   fg = |g| / (|g| + eps_p)
//
// fu = fg = 1 without producers (eps_p = 0). With them, the two linears' own backward is the plain
// GEMM: one pass here replaces the product's passes plus two factor and two rescale passes.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lrp::cpu {

enum class Activation : int { kSiLU = 0, kGeluTanh = 1 };

// grad_m, g, u: one shape, one dtype (float32 / bfloat16 / float16), CPU. Undefined outputs
// for the inputs that need no gradient.
std::tuple<at::Tensor, at::Tensor> gated_product_backward(const at::Tensor& grad_m, const at::Tensor& g,
                                                          const at::Tensor& u, Activation act, double eps,
                                                          double producer_eps, bool need_g, bool need_u);

}  // namespace lrp::cpu
