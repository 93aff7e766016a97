// lrp_kernels C++ extension: RMSNorm-identity and LayerNorm (SPEC.md, AttnLRP Prop. 3.4).
//
// Every function takes and returns tensors shaped like the PyTorch fallback in
// lrp_kernels/ops/norm.py: x is [..., hidden], treated as [rows, hidden]; statistics (mean,
// rstd) are float32 (float64 for float64 input) of shape x.shape[:-1]; outputs have the
// input's dtype.  Arithmetic is float32 (float64 for float64) whatever the storage dtype.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <type_traits>
#include <tuple>

namespace lrp {

using OptTensor = std::optional<at::Tensor>;

// y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps); returns (y, rstd).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight,
                                                    double eps);
// Gradient view (rstd is a constant): G_x = G_y * w * rstd.
at::Tensor rms_norm_backward(const at::Tensor& grad_y, const OptTensor& weight,
                             const at::Tensor& rstd);
// y = w * (x - mean) * rstd + b; returns (y, mean, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x,
                                                                  const OptTensor& weight,
                                                                  const OptTensor& bias, double eps);
// relevance=false: u = G_y * w * rstd, G_x = u - mean(u).
// relevance=true:  R_c = (y - b) * R_y / stab(y), n = R_c / stab(x - mean), R_x = x * (n - mean(n)).
at::Tensor layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                               double epsilon, bool relevance);

// rstd alone (no y written), for callers that take y from the module's own forward.
at::Tensor rms_norm_rstd(const at::Tensor& x, double eps);

namespace cpu {
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps);
at::Tensor rms_norm_rstd(const at::Tensor& x, double eps);
at::Tensor rms_norm_backward(const at::Tensor& grad_y, const OptTensor& weight, const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const OptTensor& weight,
                                                                  const OptTensor& bias, double eps);
at::Tensor layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                               double epsilon, bool relevance);
}  // namespace cpu

#ifdef LRP_WITH_CUDA
namespace cuda {
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps);
at::Tensor rms_norm_backward(const at::Tensor& grad_y, const OptTensor& weight, const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const OptTensor& weight,
                                                                  const OptTensor& bias, double eps);
at::Tensor layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                               double epsilon, bool relevance);
}  // namespace cuda
#endif

// Shared preparation (both devices): the accumulation dtype of a storage dtype, and the
// per-feature parameters as contiguous vectors in that dtype (hidden elements: cheap).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
template <typename T>
using acc_t_of = std::conditional_t<std::is_same_v<T, double>, double, float>;
inline at::Tensor param_as(const OptTensor& p, at::ScalarType acc) {
  return p.has_value() && p->defined() ? p->to(acc).contiguous() : at::Tensor();
}

}  // namespace lrp
