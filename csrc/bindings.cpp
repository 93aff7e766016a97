// Python bindings (pybind11 via torch.utils.cpp_extension) and the device switch.
// Built and loaded by lrp_kernels/_cpp.py; the Python side checks arguments first
// (lrp_kernels/ops/norm.py), the checks here only guard memory safety.
#include <torch/extension.h>

#include "cpu_common.h"
#include "epsilon.h"
#include "gated.h"
#include "norm.h"

namespace lrp {
namespace {

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dim (the normalised last dim)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be a floating-point tensor, got ",
              x.scalar_type());
}

void check_param(const OptTensor& p, const at::Tensor& x, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), name, " must have shape (", x.size(-1),
              ",) (x's last dim), got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), name, " must be on ", x.device(), ", got ", p->device());
}

bool on_cuda(const at::Tensor& x) {
  if (!x.is_cuda()) {
    TORCH_CHECK(x.device().is_cpu(), "lrp_kernels C++ extension: unsupported device ", x.device());
    return false;
  }
#ifdef LRP_WITH_CUDA
  return true;
#else
  TORCH_CHECK(false, "lrp_kernels C++ extension was built without CUDA");
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps) {
  check_x(x, "x");
  check_param(weight, x, "weight");
#ifdef LRP_WITH_CUDA
  if (on_cuda(x)) return cuda::rms_norm_forward(x, weight, eps);
#else
  on_cuda(x);
#endif
  return cpu::rms_norm_forward(x, weight, eps);
}

at::Tensor rms_norm_rstd(const at::Tensor& x, double eps) {
  check_x(x, "x");
#ifdef LRP_WITH_CUDA
  if (on_cuda(x)) return std::get<1>(cuda::rms_norm_forward(x, std::nullopt, eps));
#else
  on_cuda(x);
#endif
  return cpu::rms_norm_rstd(x, eps);
}

at::Tensor rms_norm_backward(const at::Tensor& grad_y, const OptTensor& weight, const at::Tensor& rstd) {
  check_x(grad_y, "grad_y");
  check_param(weight, grad_y, "weight");
#ifdef LRP_WITH_CUDA
  if (on_cuda(grad_y)) return cuda::rms_norm_backward(grad_y, weight, rstd);
#else
  on_cuda(grad_y);
#endif
  return cpu::rms_norm_backward(grad_y, weight, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const OptTensor& weight,
                                                                  const OptTensor& bias, double eps) {
  check_x(x, "x");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
#ifdef LRP_WITH_CUDA
  if (on_cuda(x)) return cuda::layer_norm_forward(x, weight, bias, eps);
#else
  on_cuda(x);
#endif
  return cpu::layer_norm_forward(x, weight, bias, eps);
}

at::Tensor layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                               double epsilon, bool relevance) {
  check_x(x, "x");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
#ifdef LRP_WITH_CUDA
  if (on_cuda(x)) return cuda::layer_norm_backward(grad_y, x, weight, bias, mean, rstd, epsilon, relevance);
#else
  on_cuda(x);
#endif
  return cpu::layer_norm_backward(grad_y, x, weight, bias, mean, rstd, epsilon, relevance);
}

}  // namespace lrp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrp_kernels C++ kernels: RMSNorm-identity and LayerNorm (SPEC.md)";
  m.def("rms_norm_forward", &lrp::rms_norm_forward, "(x, weight|None, eps) -> (y, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_rstd", &lrp::rms_norm_rstd, "(x, eps) -> rstd = 1 / sqrt(mean(x^2) + eps) (no y written)",
        py::arg("x"), py::arg("eps"));
  m.def("rms_norm_backward", &lrp::rms_norm_backward, "gradient view: (grad_y, weight|None, rstd) -> grad_x",
        py::arg("grad_y"), py::arg("weight"), py::arg("rstd"));
  m.def("layer_norm_forward", &lrp::layer_norm_forward, "(x, weight|None, bias|None, eps) -> (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_backward", &lrp::layer_norm_backward,
        "(grad_y, x, weight|None, bias|None, mean, rstd, epsilon, relevance) -> grad_x",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("rstd"), py::arg("epsilon"), py::arg("relevance"));
  m.def("epsilon_factor", [](const at::Tensor& z, double eps) {
          TORCH_CHECK(z.device().is_cpu() && at::isFloatingType(z.scalar_type()), "z must be a floating CPU tensor");
          TORCH_CHECK(eps > 0, "eps must be > 0");
          return lrp::cpu::epsilon_factor(z, eps);
        }, "gradient view: q = eps / (|z| + eps) in z's dtype", py::arg("z"), py::arg("eps"));
  m.def("epsilon_output_backward", [](const at::Tensor& grad_y, const at::Tensor& q, double share) {
          TORCH_CHECK(grad_y.device().is_cpu() && q.device().is_cpu(), "grad_y and q must be CPU tensors");
          TORCH_CHECK(grad_y.sizes() == q.sizes(), "grad_y and q must have one shape");
          TORCH_CHECK(at::isFloatingType(grad_y.scalar_type()) && at::isFloatingType(q.scalar_type()),
                      "grad_y and q must be floating-point");
          return lrp::cpu::epsilon_output_backward(grad_y, q, share);
        }, "gradient view: G_y * (1 - q) / share in G_y's dtype", py::arg("grad_y"), py::arg("q"), py::arg("share"));
  m.def("gated_product_backward", [](const at::Tensor& grad_m, const at::Tensor& g, const at::Tensor& u, int act,
                                     double eps, double producer_eps, bool need_g, bool need_u) {
          for (const at::Tensor* t : {&grad_m, &g, &u}) {
            TORCH_CHECK(t->device().is_cpu(), "grad_m, g and u must be CPU tensors");
            TORCH_CHECK(t->sizes() == g.sizes() && t->scalar_type() == g.scalar_type(),
                        "grad_m, g and u must have one shape and one dtype");
          }
          TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16 ||
                      g.scalar_type() == at::kHalf, "gated_product_backward: float32/bfloat16/float16 only");
          TORCH_CHECK(act == 0 || act == 1, "act must be 0 (silu) or 1 (gelu_tanh)");
          TORCH_CHECK(eps > 0 && producer_eps >= 0, "eps must be > 0 and producer_eps >= 0");
          return lrp::cpu::gated_product_backward(grad_m, g, u, static_cast<lrp::cpu::Activation>(act), eps,
                                                  producer_eps, need_g, need_u);
        }, "gradient view: (grad_m, g, u, act, eps, producer_eps, need_g, need_u) -> (G_g|None, G_u|None)",
        py::arg("grad_m"), py::arg("g"), py::arg("u"), py::arg("act"), py::arg("eps"), py::arg("producer_eps"),
        py::arg("need_g"), py::arg("need_u"));
  m.def("set_huge_page_advice", &lrp::cpu::set_huge_page_advice,
        "advise transparent huge pages for large CPU outputs (on) or not (off)", py::arg("on"));
  m.def("huge_page_advice", &lrp::cpu::huge_page_advice, "whether large CPU outputs get the huge-page advice");
#ifdef LRP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
