// CUDA kernels of RMSNorm-identity and LayerNorm (math: norm.h, SPEC.md).
//
// Free of torch headers on purpose: plain pointers in, so the file compiles with nvcc alone
// (tests/test_cpp_norm.py checks that wherever nvcc exists, and runs it on a GPU when present).
// One thread block per row; float accumulation (double for double); w and b always present
// (the caller passes ones / zeros for a missing weight / bias).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lrp {
namespace cuda_kernels {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v);
template <> __device__ __forceinline__ float from_acc<float, float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double, double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename A>
__device__ __forceinline__ A stab(A z, A eps) {  // z + eps * sgn(z), sgn(0) = +1
  return z + (z >= A(0) ? eps : -eps);
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

template <typename T, typename A>
__global__ void rms_forward_kernel(const T* __restrict__ x, const A* __restrict__ w, T* __restrict__ y,
                                   A* __restrict__ rstd, int64_t H, A eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * H;
  T* yr = y + row * H;
  A ss = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const A v = to_acc(xr[i]);
    ss += v * v;
  }
  const A rs = A(1) / sqrt(block_sum(ss) / A(H) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) yr[i] = from_acc<T, A>(to_acc(xr[i]) * rs * w[i]);
}

template <typename T, typename A>
__global__ void rms_backward_kernel(const T* __restrict__ gy, const A* __restrict__ w,
                                    const A* __restrict__ rstd, T* __restrict__ gx, int64_t H) {
  const int64_t row = blockIdx.x;
  const A rs = rstd[row];
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
    gx[row * H + i] = from_acc<T, A>(to_acc(gy[row * H + i]) * rs * w[i]);
}

template <typename T, typename A>
__global__ void ln_forward_kernel(const T* __restrict__ x, const A* __restrict__ w, const A* __restrict__ b,
                                  T* __restrict__ y, A* __restrict__ mean, A* __restrict__ rstd, int64_t H,
                                  A eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * H;
  T* yr = y + row * H;
  A s = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) s += to_acc(xr[i]);
  const A mu = block_sum(s) / A(H);
  A ss = 0;  // two-pass variance
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const A c = to_acc(xr[i]) - mu;
    ss += c * c;
  }
  const A rs = A(1) / sqrt(block_sum(ss) / A(H) + eps);
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
    yr[i] = from_acc<T, A>((to_acc(xr[i]) - mu) * rs * w[i] + b[i]);
}

template <typename T, typename A>
__global__ void ln_backward_grad_kernel(const T* __restrict__ gy, const A* __restrict__ w,
                                        const A* __restrict__ rstd, T* __restrict__ gx, int64_t H) {
  const int64_t row = blockIdx.x;
  const T* gr = gy + row * H;
  const A rs = rstd[row];
  A su = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) su += to_acc(gr[i]) * rs * w[i];
  const A mu = block_sum(su) / A(H);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
    gx[row * H + i] = from_acc<T, A>(to_acc(gr[i]) * rs * w[i] - mu);
}

template <typename T, typename A>
__device__ __forceinline__ A ln_relevance_n(const T* rr, const T* xr, const A* w, const A* b, A mu, A rs,
                                            A epsilon, int64_t i) {
  const A c = to_acc(xr[i]) - mu;
  const A yb = c * rs * w[i];  // y - b
  const A r_c = yb * to_acc(rr[i]) / stab(yb + b[i], epsilon);
  return r_c / stab(c, epsilon);
}

template <typename T, typename A>
__global__ void ln_backward_relevance_kernel(const T* __restrict__ ry, const T* __restrict__ x,
                                             const A* __restrict__ w, const A* __restrict__ b,
                                             const A* __restrict__ mean, const A* __restrict__ rstd,
                                             T* __restrict__ rx, int64_t H, A epsilon) {
  const int64_t row = blockIdx.x;
  const T* rr = ry + row * H;
  const T* xr = x + row * H;
  const A mu = mean[row], rs = rstd[row];
  A sn = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) sn += ln_relevance_n(rr, xr, w, b, mu, rs, epsilon, i);
  const A mn = block_sum(sn) / A(H);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)  // recompute n: cheaper than a round trip
    rx[row * H + i] = from_acc<T, A>(to_acc(xr[i]) * (ln_relevance_n(rr, xr, w, b, mu, rs, epsilon, i) - mn));
}

inline int threads_for(int64_t H) {
  int64_t t = ((H + 3) / 4 + 31) / 32 * 32;  // ~4 elements per thread
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

// ---- host launchers (T: float, double, __half, __nv_bfloat16; A = Acc<T>::type) -------------
template <typename T, typename A = typename Acc<T>::type>
cudaError_t rms_forward(const T* x, const A* w, T* y, A* rstd, int64_t rows, int64_t H, double eps,
                        cudaStream_t stream) {
  if (rows > 0) rms_forward_kernel<T, A><<<rows, threads_for(H), 0, stream>>>(x, w, y, rstd, H, A(eps));
  return cudaGetLastError();
}

template <typename T, typename A = typename Acc<T>::type>
cudaError_t rms_backward(const T* gy, const A* w, const A* rstd, T* gx, int64_t rows, int64_t H,
                         cudaStream_t stream) {
  if (rows > 0) rms_backward_kernel<T, A><<<rows, threads_for(H), 0, stream>>>(gy, w, rstd, gx, H);
  return cudaGetLastError();
}

template <typename T, typename A = typename Acc<T>::type>
cudaError_t ln_forward(const T* x, const A* w, const A* b, T* y, A* mean, A* rstd, int64_t rows, int64_t H,
                       double eps, cudaStream_t stream) {
  if (rows > 0) ln_forward_kernel<T, A><<<rows, threads_for(H), 0, stream>>>(x, w, b, y, mean, rstd, H, A(eps));
  return cudaGetLastError();
}

template <typename T, typename A = typename Acc<T>::type>
cudaError_t ln_backward(const T* gy, const T* x, const A* w, const A* b, const A* mean, const A* rstd, T* gx,
                        int64_t rows, int64_t H, double epsilon, bool relevance, cudaStream_t stream) {
  if (rows == 0) return cudaGetLastError();
  if (relevance)
    ln_backward_relevance_kernel<T, A><<<rows, threads_for(H), 0, stream>>>(gy, x, w, b, mean, rstd, gx, H,
                                                                            A(epsilon));
  else
    ln_backward_grad_kernel<T, A><<<rows, threads_for(H), 0, stream>>>(gy, w, rstd, gx, H);
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace lrp
