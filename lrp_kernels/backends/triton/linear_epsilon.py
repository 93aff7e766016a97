r"""Epsilon-linear backward as ONE fused GEMM (op ``linear_epsilon_backward``).

For ``z = x @ W.T + b`` (``x [M, K]``, ``W [N, K]``; leading batch dims are flattened into
``M``), the epsilon rule of docs/math.md is

    relevance view:  R_x = x * ((R_z / stab(z)) @ W)
    gradient view:   G_x = (G_z * z / stab(z)) @ W

with ``stab(z) = z + eps * sgn(z)``, ``sgn(0) = +1``, in float32. Both are one GEMM
``out[M, K] = h[M, N] @ W[N, K]`` whose left operand ``h = grad_z * scale / stab(z)`` (times
``z`` in the gradient view) is computed in float32 while its tile is loaded (prologue), and
whose result is multiplied by ``x`` as it is stored (epilogue, relevance view). No
intermediate ``[M, N]`` or ``[M, K]`` tensor exists.

The kernel, :func:`eps_gemm`, is generic over strides and a batch dimension
(``out[b] = prologue(G[b], Z[b]) @ W[b] (* X[b])``): the uniform-epsilon matmul
(``matmul_ue.py``) launches it too.

Precision: the prologue and accumulation are float32. The dot runs in the weight's dtype for
bfloat16 (tensor cores; ``h`` is rounded to bfloat16 like any bf16 GEMM operand), in IEEE
float32 for float32, and in TF32 on float32-converted operands for float16 (``h`` can exceed
float16's range). Under the interpreter every dot is float32.

On a GPU the tile sizes are autotuned per shape (a small config list);
``LRP_KERNELS_TRITON_AUTOTUNE=0`` uses one fixed config instead (fast compiles, for tests).

``z=None`` recomputes ``z = F.linear(x, W, b)`` first (a separate cuBLAS GEMM; see
``benchmarks/bench_ops.py``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import dispatch
from .. import triton as _backend
from . import stabilize


def _configs(swap_variants: bool) -> list:
    """Autotune list. ``SWAP_AB`` computes the transposed tile ``W^T @ h^T`` (the scaled
    operand becomes the tensor-core B operand, staged through shared memory) instead of
    ``h @ W`` (A operand from registers); which is faster depends on the compiler and shape."""
    c = triton.Config
    base = [
        ({"BLOCK_I": 128, "BLOCK_J": 256, "BLOCK_R": 64, "GROUP_I": 8}, 8, 3),
        ({"BLOCK_I": 256, "BLOCK_J": 128, "BLOCK_R": 64, "GROUP_I": 8}, 8, 3),
        ({"BLOCK_I": 128, "BLOCK_J": 128, "BLOCK_R": 64, "GROUP_I": 8}, 8, 4),
        ({"BLOCK_I": 128, "BLOCK_J": 128, "BLOCK_R": 64, "GROUP_I": 8}, 4, 4),
        ({"BLOCK_I": 64, "BLOCK_J": 128, "BLOCK_R": 64, "GROUP_I": 8}, 4, 4),
        ({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_R": 32, "GROUP_I": 8}, 4, 3),
    ]
    out = [c({**kw, "SWAP_AB": False}, num_warps=w, num_stages=st) for kw, w, st in base]
    if swap_variants:
        out += [c({**kw, "SWAP_AB": True}, num_warps=w, num_stages=st) for kw, w, st in base[:4]]
    return out


# fixed tile sizes under the interpreter (no autotune: it would run every config on the CPU)
INTERPRET_CONFIG = {"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_R": 32, "GROUP_I": 4, "SWAP_AB": False}
# fixed GPU config when LRP_KERNELS_TRITON_AUTOTUNE=0 (tests: one compile per variant, not seven)
FIXED_CONFIG = {"BLOCK_I": 128, "BLOCK_J": 128, "BLOCK_R": 32, "GROUP_I": 8, "SWAP_AB": False,
                "num_warps": 4, "num_stages": 3}


@triton.jit
def _eps_gemm_kernel(
    G, Z, W, X, OUT,
    I, J, R,
    stride_gb, stride_gi, stride_gr,
    stride_zb, stride_zi, stride_zr,
    stride_wb, stride_wr, stride_wj,
    stride_xb, stride_xi, stride_xj,
    stride_ob, stride_oi, stride_oj,
    eps, scale,
    RELEVANCE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_I: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """One ``[BLOCK_I, BLOCK_J]`` tile of ``out[b] = prologue(G[b], Z[b]) @ W[b] (* X[b])``."""
    # one flat grid axis (the y/z axes stop at 65535; batch * heads can exceed that)
    n_i = tl.cdiv(I, BLOCK_I)
    n_j = tl.cdiv(J, BLOCK_J)
    flat = tl.program_id(0).to(tl.int64)
    batch = flat // (n_i * n_j)
    pid = (flat % (n_i * n_j)).to(tl.int32)
    # grouped tile order: GROUP_I row-tiles share the W column-tiles in L2
    per_group = GROUP_I * n_j
    first_i = (pid // per_group) * GROUP_I
    group_rows = tl.minimum(n_i - first_i, GROUP_I)
    pid_i = first_i + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_R)
    in_i = offs_i < I
    in_j = offs_j < J
    g_ptrs = G + batch * stride_gb + offs_i[:, None] * stride_gi + offs_r[None, :] * stride_gr
    z_ptrs = Z + batch * stride_zb + offs_i[:, None] * stride_zi + offs_r[None, :] * stride_zr
    w_ptrs = W + batch * stride_wb + offs_r[:, None] * stride_wr + offs_j[None, :] * stride_wj

    if SWAP_AB:  # accumulate the transposed tile
        acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        in_r = (r0 + offs_r) < R
        left_mask = in_i[:, None] & in_r[None, :]
        g = tl.load(g_ptrs, mask=left_mask, other=0.0).to(tl.float32)
        # padding z with 1 keeps 0 / stab(z) finite even with eps = 0
        z = tl.load(z_ptrs, mask=left_mask, other=1.0).to(tl.float32)
        h = g * scale / stabilize(z, eps)
        if not RELEVANCE:
            h = h * z
        w = tl.load(w_ptrs, mask=in_r[:, None] & in_j[None, :], other=0.0)
        if DOT_FP32:
            if SWAP_AB:
                acc = tl.dot(tl.trans(w.to(tl.float32)), tl.trans(h), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(h, w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            if SWAP_AB:
                acc = tl.dot(tl.trans(w), tl.trans(h.to(w.dtype)), acc)
            else:
                acc = tl.dot(h.to(w.dtype), w, acc)
        g_ptrs += BLOCK_R * stride_gr
        z_ptrs += BLOCK_R * stride_zr
        w_ptrs += BLOCK_R * stride_wr

    if SWAP_AB:
        acc = tl.trans(acc)
    out_mask = in_i[:, None] & in_j[None, :]
    if RELEVANCE:
        x_ptrs = X + batch * stride_xb + offs_i[:, None] * stride_xi + offs_j[None, :] * stride_xj
        acc = acc * tl.load(x_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    o_ptrs = OUT + batch * stride_ob + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=out_mask)


# Linear layers (one batch, big GEMMs) may try more configs than batched matmuls (many shapes).
# The SWAP_AB variants are opt-in (LRP_KERNELS_TRITON_SWAP_AB=1) until measured on a GPU.
_SWAP_VARIANTS = os.environ.get("LRP_KERNELS_TRITON_SWAP_AB", "0") == "1"
_eps_gemm_tuned = triton.autotune(configs=_configs(_SWAP_VARIANTS), key=["I", "J", "R", "RELEVANCE"])(
    _eps_gemm_kernel)
_eps_gemm_tuned_batched = triton.autotune(configs=_configs(False), key=["I", "J", "R", "RELEVANCE"])(
    _eps_gemm_kernel)


def _dot_mode(w_dtype: torch.dtype) -> tuple[bool, str]:
    """(cast operands to float32?, tl.dot input_precision)."""
    if _backend.interpreting() or w_dtype == torch.float32:
        return True, "ieee"
    if w_dtype == torch.float16:
        return True, "tf32"  # h = grad / stab(z) can overflow float16
    return False, "tf32"  # bfloat16: native tensor-core dot (precision arg unused)


def eps_gemm(g: torch.Tensor, z: torch.Tensor, w: torch.Tensor, x: Optional[torch.Tensor],
             out: torch.Tensor, epsilon: float, scale: float, relevance: bool) -> torch.Tensor:
    """``out[b] = (g[b] * scale / stab(z[b]) (* z[b] if not relevance)) @ w[b] (* x[b] if relevance)``.

    All 3-D (``[batch, I, R]``, ``[batch, I, R]``, ``[batch, R, J]``, ``[batch, I, J]``,
    ``[batch, I, J]``), any strides; a batch stride of 0 broadcasts.
    """
    batch, I, R = g.shape
    J = w.shape[2]
    if batch == 0 or I == 0 or J == 0:
        return out
    if relevance and x is None:
        raise ValueError("eps_gemm: the relevance view needs x")
    xx = x if relevance else out  # unused pointer in the gradient view
    dot_fp32, precision = _dot_mode(w.dtype)
    args = (g, z, w, xx, out, I, J, R, *g.stride(), *z.stride(), *w.stride(), *xx.stride(),
            *out.stride(), float(epsilon), float(scale))
    flags = {"RELEVANCE": bool(relevance), "DOT_FP32": dot_fp32, "DOT_PRECISION": precision}
    if _backend.interpreting():
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]) * batch,)
        _eps_gemm_kernel[grid](*args, **flags, **cfg)
    elif os.environ.get("LRP_KERNELS_TRITON_AUTOTUNE", "1") == "0":
        cfg = FIXED_CONFIG
        grid = (triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]) * batch,)
        with torch.cuda.device(out.device):
            _eps_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(I, meta["BLOCK_I"]) * triton.cdiv(J, meta["BLOCK_J"]) * batch,)
        tuned = _eps_gemm_tuned if batch == 1 else _eps_gemm_tuned_batched
        with torch.cuda.device(out.device):
            tuned[grid](*args, **flags)
    return out


def linear_epsilon_backward_triton(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    epsilon: float,
    relevance: bool,
) -> torch.Tensor:
    """Fused epsilon-linear backward; same contract as the torch backend."""
    if z is None:  # recompute (memory-saving mode): one cuBLAS GEMM, then the fused kernel
        z = torch.nn.functional.linear(x, weight, bias)
    n_out, k_in = weight.shape
    g2 = grad_z.reshape(-1, n_out)
    z2 = z.reshape(-1, n_out)
    x2 = x.reshape(-1, k_in)
    out = _backend.alloc_output((x2.shape[0], k_in), x.dtype, x.device)
    if n_out == 0:  # empty sum
        return out.zero_().reshape(x.shape)
    eps_gemm(g2.unsqueeze(0), z2.unsqueeze(0), weight.unsqueeze(0), x2.unsqueeze(0),
             out.unsqueeze(0), epsilon, 1.0, relevance)
    return out.reshape(x.shape)


def supports(grad_z, x, weight, bias, z, epsilon, relevance) -> Optional[str]:
    """None if the fused kernel takes these inputs, else why not (auto then uses torch)."""
    return _backend.linear_reason(grad_z, x, weight, bias, z)


# Two implementations of one rule: this fused kernel and the torch path (one element-wise
# rescale + the platform GEMM). Which is faster depends on the GPU and the shape (an H200 once
# measured this kernel at 2.8-3.2x a plain bf16 GEMM, benchmarks/RESULTS.md), so auto times both
# once per process and shape class and keeps the faster; backend="triton" still forces it.
dispatch.register("linear_epsilon_backward", "triton", linear_epsilon_backward_triton, supports=supports,
                  auto="measured")
