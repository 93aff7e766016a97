r"""Uniform-epsilon rule for ``O = A @ B`` (docs/math.md; AttnLRP Prop. 3.3).

Relevance view::

    N = R_O / (2 stab(O));  R_A = A * (N @ B^T);  R_B = B * (A^T @ N)

Gradient view::

    H = G_O * O / (2 stab(O));  G_A = H @ B^T;  G_B = A^T @ H

Batched with ``torch.matmul`` broadcasting: a broadcast operand's result is summed over the
broadcast dims. If only one operand receives relevance (the other is a constant) it gets all
of it (the factor 2 becomes 1), as in the uniform product rule.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_forced_backend, check_same_device,
                      check_same_dtype, compute_dtype, pin_backend, record_backward, record_forward, stabilize,
                      stand_in)


def _matmul_shapes(a: torch.Tensor, b: torch.Tensor):
    """Views of a, b as >=2-D (torch.matmul's 1-D promotion) and the shape of ``a2 @ b2``."""
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    return a2, b2, (*batch, a2.shape[-2], b2.shape[-1])


def matmul_ue_backward_torch(
    grad_o: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    o: Optional[torch.Tensor],
    epsilon: float,
    relevance: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Reference backend; ``o=None`` recomputes ``A @ B``. ``need_*``: which inputs get relevance."""
    cd = compute_dtype(grad_o, a, b)
    a2, b2, o_shape = _matmul_shapes(a.to(cd), b.to(cd))
    o2 = (a2 @ b2) if o is None else o.to(cd).reshape(o_shape)
    g = grad_o.to(cd).reshape(o2.shape)
    share = 2.0 if (need_a and need_b) else 1.0
    h = g / (share * stabilize(o2, epsilon))
    if not relevance:
        h = h * o2
    ga = gb = None
    if need_a:
        ga = h @ b2.transpose(-1, -2)
        if relevance:
            ga = ga * a2
        ga = ga.sum_to_size(a2.shape).reshape(a.shape).to(a.dtype)
    if need_b:
        gb = a2.transpose(-1, -2) @ h
        if relevance:
            gb = gb * b2
        gb = gb.sum_to_size(b2.shape).reshape(b.shape).to(b.dtype)
    return ga, gb


dispatch.register("matmul_ue_backward", "torch", matmul_ue_backward_torch)


class MatmulUEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, epsilon, relevance, backend):
        o = torch.matmul(a, b)
        ctx.epsilon, ctx.relevance, ctx.backend = epsilon, relevance, backend
        ctx.save_for_backward(a, b, o)
        record_forward(ctx, "matmul", (a, b), o)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        a, b, o = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga, gb = dispatch.call("matmul_ue_backward", grad_o, a, b, o, ctx.epsilon, ctx.relevance,
                               need_a, need_b, backend=ctx.backend)
        record_backward(ctx, (ga, gb), grad_o, ctx.relevance, True)
        return ga, gb, None, None, None


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float = DEFAULT_EPSILON,
    *,
    relevance: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``torch.matmul(a, b)`` with the uniform-epsilon backward."""
    check_float("a", a)
    check_float("b", b)
    check_same_device(a=a, b=b)
    check_same_dtype(a=a, b=b)
    check_epsilon(epsilon)
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul needs a and b with at least 1 dim each (use mul2 for scalars)")
    ka = a.shape[-1]
    kb = b.shape[0] if b.dim() == 1 else b.shape[-2]
    if ka != kb:
        raise ValueError(f"a's last dim ({ka}) must equal b's contraction dim ({kb}); "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}")
    try:
        out_shape = torch.matmul(torch.empty(a.shape, device="meta"), torch.empty(b.shape, device="meta")).shape
    except RuntimeError:
        raise ValueError(f"a's and b's batch dims must broadcast, got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}") from None
    backend = pin_backend(backend)
    o = stand_in(a, out_shape)
    check_forced_backend("matmul_ue_backward", backend, o, a, b, o, epsilon, relevance, True, True)
    return MatmulUEFn.apply(a, b, epsilon, relevance, backend)
