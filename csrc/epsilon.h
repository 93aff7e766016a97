// The gradient view of the epsilon rule, element-wise (SPEC.md, docs/math.md "the stabiliser"):
// z / stab(z) = 1 - q with q = eps / (|z| + eps), kept in z's dtype (compact, and precise where
// z / stab(z) is close to 1). CPU kernels, one pass each over memory.
#pragma once

#include <ATen/ATen.h>

namespace lrp::cpu {

// q = eps / (|z| + eps), in z's dtype (eps > 0).
at::Tensor epsilon_factor(const at::Tensor& z, double eps);
// G_y * (1 - q) / share, in G_y's dtype (computed in float32, or float64 for double).
at::Tensor epsilon_output_backward(const at::Tensor& grad_y, const at::Tensor& q, double share);

}  // namespace lrp::cpu
