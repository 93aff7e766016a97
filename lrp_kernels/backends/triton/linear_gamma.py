r"""Gamma-rule linear backward in two fused kernels (op ``linear_gamma_backward``).

Math: :mod:`lrp_kernels.ops.linear_gamma`. For ``x [M, K]``, ``W [N, K]``:

1. ``_gamma_den_kernel`` (tile ``[BLOCK_M, BLOCK_N]`` of the outputs): splits each loaded ``x``
   tile into ``x+``/``x-`` and each ``W`` tile into ``Wp = W + gamma W+``/``Wn = W + gamma W-`` in
   registers, accumulates ``den_p`` and ``den_n`` with four dots, adds the bias terms, and in the
   epilogue picks the case by the sign of ``z`` (the given output, else ``(den_p + den_n) / (2 + gamma)``), stabilises and divides:
   it stores ``g_p``, ``g_n`` (float32 ``[M, N]``), never ``Wp``/``Wn``/``x+``/``x-``.
2. ``_gamma_bwd_kernel`` (tile ``[BLOCK_M, BLOCK_K]`` of the inputs): ``A = g_p @ Wp + g_n @ Wn``,
   ``B = g_p @ Wn + g_n @ Wp`` with the weight split again in registers; the epilogue writes
   ``x+ A + x- B`` (relevance view) or the sign selection of the gradient view.

Precision: operands are converted to float32 in registers; dots are IEEE float32 for float32
weights (and always under the interpreter), TF32 for bfloat16/float16 weights. Fixed tile
sizes (no autotune).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import dispatch
from .. import triton as _backend
from . import stabilize

GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


@triton.jit
def _gamma_den_kernel(
    X, W, B, G, Z, GP, GN,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_gm, stride_gn, stride_zm, stride_zn,
    stride_pm, stride_pn,
    gamma, eps,
    HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, RELEVANCE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + offs_k) < K
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + (k0 + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=in_k[:, None] & in_n[None, :], other=0.0).to(tl.float32)   # [BLOCK_K, BLOCK_N] = W.T
        xp = tl.maximum(x, 0.0)
        xn = tl.minimum(x, 0.0)
        wp = w + gamma * tl.maximum(w, 0.0)
        wn = w + gamma * tl.minimum(w, 0.0)
        acc_p = tl.dot(xp, wp, acc_p, input_precision=DOT_PRECISION)
        acc_p = tl.dot(xn, wn, acc_p, input_precision=DOT_PRECISION)
        acc_n = tl.dot(xp, wn, acc_n, input_precision=DOT_PRECISION)
        acc_n = tl.dot(xn, wp, acc_n, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(B + offs_n, mask=in_n, other=0.0).to(tl.float32)
        acc_p += (b + gamma * tl.maximum(b, 0.0))[None, :]
        acc_n += (b + gamma * tl.minimum(b, 0.0))[None, :]
    total = acc_p + acc_n
    mask = in_m[:, None] & in_n[None, :]
    r = tl.load(G + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:  # the layer's actual output: its sign picks the case (the rule's bias may be zeroed)
        z = tl.load(Z + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
    else:
        z = total / (2.0 + gamma)
    if not RELEVANCE:
        r = r * z
    positive = z >= 0
    sp = stabilize(acc_p, eps)
    sn = stabilize(acc_n, eps)
    gp = tl.where(positive, r / sp, 0.0)
    gn = tl.where(positive, 0.0, r / sn)
    out = offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(GP + out, gp, mask=mask)
    tl.store(GN + out, gn, mask=mask)


@triton.jit
def _gamma_bwd_kernel(
    GP, GN, W, X, OUT,
    M, N, K,
    stride_pm, stride_pn, stride_wn, stride_wk, stride_xm, stride_xk, stride_om, stride_ok,
    gamma,
    RELEVANCE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_k = offs_k < K
    acc_a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        in_n = (n0 + offs_n) < N
        pmask = in_m[:, None] & in_n[None, :]
        p_off = offs_m[:, None] * stride_pm + (n0 + offs_n)[None, :] * stride_pn
        gp = tl.load(GP + p_off, mask=pmask, other=0.0)
        gn = tl.load(GN + p_off, mask=pmask, other=0.0)
        w = tl.load(W + (n0 + offs_n)[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=in_n[:, None] & in_k[None, :], other=0.0).to(tl.float32)    # [BLOCK_N, BLOCK_K]
        wp = w + gamma * tl.maximum(w, 0.0)
        wn = w + gamma * tl.minimum(w, 0.0)
        acc_a = tl.dot(gp, wp, acc_a, input_precision=DOT_PRECISION)
        acc_a = tl.dot(gn, wn, acc_a, input_precision=DOT_PRECISION)
        acc_b = tl.dot(gp, wn, acc_b, input_precision=DOT_PRECISION)
        acc_b = tl.dot(gn, wp, acc_b, input_precision=DOT_PRECISION)
    mask = in_m[:, None] & in_k[None, :]
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if RELEVANCE:
        out = tl.maximum(x, 0.0) * acc_a + tl.minimum(x, 0.0) * acc_b
    else:
        out = tl.where(x > 0, acc_a, tl.where(x < 0, acc_b, acc_a + acc_b))
    tl.store(OUT + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
             out.to(OUT.dtype.element_ty), mask=mask)


def linear_gamma_backward_triton(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    gamma: float,
    epsilon: float,
    relevance: bool,
) -> torch.Tensor:
    """Fused gamma-linear backward; same contract as the torch backend."""
    n_out, k_in = weight.shape
    x2 = x.reshape(-1, k_in)
    g2 = grad_z.reshape(-1, n_out)
    z2 = None if z is None else z.reshape(-1, n_out)
    m = x2.shape[0]
    out = _backend.alloc_output((m, k_in), x.dtype, x.device)
    if m == 0 or k_in == 0:
        return out.reshape(x.shape)
    if n_out == 0:  # empty sum
        return out.zero_().reshape(x.shape)
    precision = "ieee" if (_backend.interpreting() or weight.dtype == torch.float32) else "tf32"
    cfg = dict(INTERPRET_CONFIG if _backend.interpreting() else GPU_CONFIG)
    # float32 g_p / g_n: written and read once each (the only [M, N] intermediates)
    gp = torch.empty((m, n_out), dtype=torch.float32, device=x.device)
    gn = torch.empty_like(gp)
    zz = g2 if z2 is None else z2  # placeholder pointer when HAS_Z is False
    bb = weight if bias is None else bias
    den_grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n_out, cfg["BLOCK_N"]))
    bwd_grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(k_in, cfg["BLOCK_K"]))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gamma_den_kernel[den_grid](
            x2, weight, bb, g2, zz, gp, gn, m, n_out, k_in,
            *x2.stride(), *weight.stride(), *g2.stride(), *zz.stride(), *gp.stride(),
            float(gamma), float(epsilon),
            HAS_BIAS=bias is not None, HAS_Z=z2 is not None, RELEVANCE=bool(relevance),
            DOT_PRECISION=precision, **cfg)
        _gamma_bwd_kernel[bwd_grid](
            gp, gn, weight, x2, out, m, n_out, k_in,
            *gp.stride(), *weight.stride(), *x2.stride(), *out.stride(),
            float(gamma), RELEVANCE=bool(relevance), DOT_PRECISION=precision, **cfg)
    return out.reshape(x.shape)


def supports(grad_z, x, weight, bias, z, gamma, epsilon, relevance) -> Optional[str]:
    """None if the fused kernels take these inputs, else why not (auto then uses torch)."""
    return _backend.linear_reason(grad_z, x, weight, bias, z)


dispatch.register("linear_gamma_backward", "triton", linear_gamma_backward_triton, supports=supports)
