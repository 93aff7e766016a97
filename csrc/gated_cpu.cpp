// CPU kernel of the gated product's backward (math: gated.h). One `omp simd` loop over
// contiguous memory: reads G_m, g, u once, writes G_g and G_u once; the activation is recomputed
// in-register (its exp written so that the loop vectorises without -ffast-math), and each output
// is one fraction: one division, the slowest vector instruction here.
#include "gated.h"
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lrp::cpu {
namespace {

// e^x in float, ~2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r,
// 2^n from the exponent bits). x is clamped to [-87, 88] so 2^n stays a normal float: results
// below e^-87 (1.6e-38) are returned as e^-87, which only matters where they multiply a finite
// number into something smaller than any float the callers keep.
inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : x;  // NaN stays NaN (and makes the result NaN)
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// act(x) as a fraction num / den, so that the kernel divides once per output
template <Activation ACT>
inline void activation(float x, float& num, float& den) {
  if constexpr (ACT == Activation::kSiLU) {  // x / (1 + e^-x)
    num = x;
    den = 1.0f + exp_vec(-x);
  } else {  // 0.5 x (1 + tanh(y)) = x E / (E + 1), E = e^{2y}, y = c (x + 0.044715 x^3)
    float y2 = 1.5957691216057308f * (x + 0.044715f * x * x * x);
    y2 = y2 < -30.0f ? -30.0f : y2;  // tanh is +-1 in float beyond; keeps x * E finite
    y2 = y2 > 30.0f ? 30.0f : y2;
    const float e = exp_vec(y2);
    num = x * e;
    den = e + 1.0f;
  }
}

// |z| / (|z| + eps_p) as a fraction: z / stab(z) of the producing epsilon linear (a template
// switch, not a branch: a division under a condition keeps the loop from vectorising)
template <bool PRODUCERS>
inline void producer_factor(float z, float eps_p, float& num, float& den) {
  if constexpr (PRODUCERS) {
    num = std::abs(z);
    den = num + eps_p;
  } else {
    num = den = 1.0f;
  }
}

template <typename T, Activation ACT, bool NEED_G, bool NEED_U, bool PRODUCERS>
void kernel(const T* gm, const T* g, const T* u, T* gg, T* gu, int64_t n, float k, float eps, float eps_p) {
  at::parallel_for(0, n, grain(1), [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float gv = load<float>(g[i]), uv = load<float>(u[i]);
      float s_num, s_den, fg_num, fg_den, fu_num, fu_den;
      activation<ACT>(gv, s_num, s_den);
      const float h = load<float>(gm[i]) * k;
      if constexpr (NEED_U) {
        producer_factor<PRODUCERS>(uv, eps_p, fu_num, fu_den);
        gu[i] = store<T>((h * s_num * fu_num) / (s_den * fu_den));
      }
      if constexpr (NEED_G) {
        producer_factor<PRODUCERS>(gv, eps_p, fg_num, fg_den);
        gg[i] = store<T>((h * uv * s_num * fg_num) / (s_den * stab(gv, eps) * fg_den));
      }
    }
  });
}

template <typename T, Activation ACT, bool PRODUCERS>
void run_needed(const T* gm, const T* g, const T* u, T* gg, T* gu, int64_t n, float k, float eps, float eps_p) {
  if (gg && gu) kernel<T, ACT, true, true, PRODUCERS>(gm, g, u, gg, gu, n, k, eps, eps_p);
  else if (gg) kernel<T, ACT, true, false, PRODUCERS>(gm, g, u, gg, gu, n, k, eps, eps_p);
  else if (gu) kernel<T, ACT, false, true, PRODUCERS>(gm, g, u, gg, gu, n, k, eps, eps_p);
}

template <typename T, Activation ACT>
void run(const T* gm, const T* g, const T* u, T* gg, T* gu, int64_t n, float k, float eps, float eps_p) {
  if (eps_p > 0.0f) run_needed<T, ACT, true>(gm, g, u, gg, gu, n, k, eps, eps_p);
  else run_needed<T, ACT, false>(gm, g, u, gg, gu, n, k, eps, eps_p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_product_backward(const at::Tensor& grad_in, const at::Tensor& g_in,
                                                          const at::Tensor& u_in, Activation act, double eps,
                                                          double producer_eps, bool need_g, bool need_u) {
  const at::Tensor gm = grad_in.contiguous(), g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor gg = need_g ? empty_output(g) : at::Tensor();
  at::Tensor gu = need_u ? empty_output(u) : at::Tensor();
  const float k = (need_g && need_u) ? 0.5f : 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "lrp_gated_product_backward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "gated_product_backward: float64 runs on the torch path");
    } else {
      using T = scalar_t;
      T* ggp = need_g ? gg.data_ptr<T>() : nullptr;
      T* gup = need_u ? gu.data_ptr<T>() : nullptr;
      const auto e = static_cast<float>(eps), ep = static_cast<float>(producer_eps);
      if (act == Activation::kSiLU)
        run<T, Activation::kSiLU>(gm.data_ptr<T>(), g.data_ptr<T>(), u.data_ptr<T>(), ggp, gup, g.numel(), k, e, ep);
      else
        run<T, Activation::kGeluTanh>(gm.data_ptr<T>(), g.data_ptr<T>(), u.data_ptr<T>(), ggp, gup, g.numel(), k, e,
                                      ep);
    }
  });
  return {gg, gu};
}

}  // namespace lrp::cpu
