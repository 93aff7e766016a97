r"""Uniform-epsilon matmul backward as two fused GEMMs (op ``matmul_ue_backward``).

For ``O = A @ B`` (``A [..., M, K]``, ``B [..., K, N]``, equal batch shapes; docs/math.md,
AttnLRP Prop. 3.3), with ``share = 2`` (or 1 when only one operand receives relevance):

    relevance view:  Nr = R_O / (share * stab(O));      R_A = A * (Nr @ B^T);  R_B = B * (A^T @ Nr)
    gradient view:   H  = G_O * O / (share * stab(O));  G_A = H @ B^T;          G_B = A^T @ H

Both products are launches of the fused GEMM of ``linear_epsilon.py`` (:func:`eps_gemm`):
the scaled operand ``Nr`` / ``H`` is computed in float32 while its tile is loaded, and the
multiply by ``A`` / ``B`` happens as the result is stored. ``R_B`` is computed transposed,
``R_B^T = (Nr^T @ A) * B^T``, so the scaled operand is always the left one; only strides
change, nothing is copied. Batched over the (flattened) leading dims, e.g. attention
``[B, H, N, d] @ [B, H, d, N]``. Broadcast batch dims (whose results need a sum) and 1-D
operands are left to the torch backend (``supports`` says why).

``o=None`` recomputes ``O = A @ B`` first (one torch.matmul).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from .. import triton as _backend
from .linear_epsilon import eps_gemm


def matmul_ue_backward_triton(
    grad_o: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    o: Optional[torch.Tensor],
    epsilon: float,
    relevance: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused uniform-epsilon matmul backward; same contract as the torch backend."""
    if not (need_a or need_b):
        return None, None
    if o is None:
        o = torch.matmul(a, b)
    m, k = a.shape[-2:]
    n = b.shape[-1]
    a3, b3 = a.reshape(-1, m, k), b.reshape(-1, k, n)
    g3, o3 = grad_o.reshape(-1, m, n), o.reshape(-1, m, n)
    scale = 1.0 / (2.0 if (need_a and need_b) else 1.0)
    grad_a = grad_b = None
    if need_a:  # [M, K] = H[M, N] @ B^T[N, K]  (* A)
        out = _backend.alloc_output(a3.shape, a.dtype, a.device)
        if n == 0:
            out.zero_()
        else:
            eps_gemm(g3, o3, b3.transpose(1, 2), a3, out, epsilon, scale, relevance)
        grad_a = out.reshape(a.shape)
    if need_b:  # [N, K] = H^T[N, M] @ A[M, K]  (* B^T), stored transposed into [K, N]
        out = _backend.alloc_output(b3.shape, b.dtype, b.device)
        if m == 0:
            out.zero_()
        else:
            eps_gemm(g3.transpose(1, 2), o3.transpose(1, 2), a3, b3.transpose(1, 2),
                     out.transpose(1, 2), epsilon, scale, relevance)
        grad_b = out.reshape(b.shape)
    return grad_a, grad_b


def supports(grad_o, a, b, o, epsilon, relevance, need_a, need_b) -> Optional[str]:
    """None if the fused kernels take these inputs, else why not (auto then uses torch)."""
    reason = _backend.device_reason(grad_o, a, b, o)
    if reason:
        return reason
    if a.dim() < 2 or b.dim() < 2:
        return f"1-D operands (a {tuple(a.shape)}, b {tuple(b.shape)}) are left to the torch backend"
    if a.shape[:-2] != b.shape[:-2]:
        return (f"broadcast batch dims (a {tuple(a.shape)}, b {tuple(b.shape)}) need a sum over the "
                f"broadcast dims; left to the torch backend")
    if a.shape[-1] != b.shape[-2]:
        return f"a {tuple(a.shape)} and b {tuple(b.shape)} do not multiply"
    expected = (*a.shape[:-1], b.shape[-1])
    if tuple(grad_o.shape) != expected:
        return f"grad_o has shape {tuple(grad_o.shape)}, expected {expected}"
    if o is not None and tuple(o.shape) != expected:
        return f"o has shape {tuple(o.shape)}, expected {expected}"
    return None


dispatch.register("matmul_ue_backward", "triton", matmul_ue_backward_triton, supports=supports)
