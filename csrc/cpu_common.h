// Shared by the CPU kernels (norm_cpu.cpp, epsilon_cpu.cpp): storage <-> accumulation types with
// vectorisable bf16/fp16 conversions, the stabiliser, the parallel grain, and fresh outputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lrp::cpu {

// ---- storage <-> accumulation type ---------------------------------------------------------
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A, typename T>
inline A load(T v) {
  return static_cast<A>(v);
}
template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;  // bf16 is the top half of a float
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <>
inline float load<float, c10::Half>(c10::Half v) {
#if defined(__FLT16_MANT_DIG__) && (defined(__x86_64__) || defined(__aarch64__))
  _Float16 h;
  std::memcpy(&h, &v.x, sizeof h);
  return static_cast<float>(h);  // one vcvtph2ps per vector with F16C
#else
  return static_cast<float>(v);
#endif
}

template <typename T, typename A>
inline T store(A v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  // round to nearest even (as c10::BFloat16 does); NaN stays a quiet NaN
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(v != v ? uint16_t(0x7fc0) : rounded, c10::BFloat16::from_bits());
}
template <>
inline c10::Half store<c10::Half, float>(float v) {
#if defined(__FLT16_MANT_DIG__) && (defined(__x86_64__) || defined(__aarch64__))
  const _Float16 h = static_cast<_Float16>(v);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return c10::Half(bits, c10::Half::from_bits());
#else
  return static_cast<c10::Half>(v);
#endif
}

template <typename A>
inline A stab(A z, A eps) {  // SPEC: z + eps * sgn(z), sgn(0) = +1
  return z + (z >= A(0) ? eps : -eps);
}

// rows per parallel task: enough work (~16K elements) to amortise the task overhead
// (element-wise kernels pass hidden = 1: 16K elements per task)
inline int64_t grain(int64_t hidden) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden));
}

// A fresh output of x's shape and dtype. Large outputs may ask for transparent huge pages before
// their first touch: faulting in a fresh buffer page by page costs more than the kernel itself
// (128 MiB: ~120 ms of 4 KiB faults vs ~20 ms with 2 MiB pages). But where the kernel's THP
// `defrag` setting compacts memory synchronously for advised regions, one fault can stall for
// tens of ms, so the Python side decides per machine (set_huge_page_advice; off until it does).
inline std::atomic<bool> g_advise_huge_pages{false};

inline at::Tensor empty_output(const at::Tensor& x) {
  at::Tensor t = at::empty(x.sizes(), x.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + t.nbytes()) & ~(kHuge - 1);
  if (g_advise_huge_pages.load(std::memory_order_relaxed) && t.nbytes() >= 4 * kHuge && end > begin)
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

inline void set_huge_page_advice(bool on) { g_advise_huge_pages.store(on, std::memory_order_relaxed); }

inline bool huge_page_advice() { return g_advise_huge_pages.load(std::memory_order_relaxed); }

}  // namespace lrp::cpu
