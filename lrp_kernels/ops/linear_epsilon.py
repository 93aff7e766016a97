r"""Epsilon rule for a linear layer ``z = x @ W.T + b`` (SPEC.md; AttnLRP Eq. 8).

Relevance view::

    R_x = x * ((R_z / stab(z)) @ W)

Gradient view::

    G_x = (G_z * z / stab(z)) @ W

Both are one kernel op, ``linear_epsilon_backward``: the left operand of the GEMM is
``grad_z / stab(z)`` (times ``z`` in the gradient view) and the result is multiplied by ``x``
in the relevance view. The weight and bias receive no relevance (they are parameters).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_same_device,
                      check_same_dtype, compute_dtype, is_zero, pin_backend, record_backward, record_forward,
                      stabilize)


def linear_epsilon_backward_torch(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    epsilon: float,
    relevance: bool,
) -> torch.Tensor:
    """Reference backend. ``z=None`` recomputes ``z`` from ``x, weight, bias``."""
    if z is None:
        z = torch.nn.functional.linear(x, weight, bias)
    cd = compute_dtype(grad_z, x, weight)
    scale = grad_z.to(cd) / stabilize(z, epsilon).to(cd)
    if not relevance:
        scale = scale * z.to(cd)
    out = scale @ weight.to(cd)
    if relevance:
        out = out * x.to(cd)
    return out.to(x.dtype)


dispatch.register("linear_epsilon_backward", "torch", linear_epsilon_backward_torch)


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epsilon: float) -> None:
    check_float("x", x)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dim must equal weight.shape[1] = {weight.shape[1]} (in_features), "
            f"got x of shape {tuple(x.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    check_same_dtype(x=x, weight=weight, bias=bias)
    check_epsilon(epsilon)


class LinearEpsilonFn(torch.autograd.Function):
    """Forward: ``F.linear``. Backward: the epsilon rule in the chosen view."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon, relevance, backend, recompute):
        z = torch.nn.functional.linear(x, weight, bias)
        ctx.epsilon, ctx.relevance, ctx.backend, ctx.recompute = epsilon, relevance, backend, recompute
        # recompute=True saves memory at long context: z is rebuilt in the backward
        ctx.save_for_backward(x, weight, bias, None if recompute else z)
        record_forward(ctx, "linear_epsilon", (x,), z)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight, bias, z = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dispatch.call("linear_epsilon_backward", grad_z, x, weight, bias, z,
                                   ctx.epsilon, ctx.relevance, backend=ctx.backend)
            # conservative only without a bias (the bias absorbs its share)
            record_backward(ctx, (grad_x,), grad_z, ctx.relevance, lambda: is_zero(bias))
        return grad_x, None, None, None, None, None, None


def linear_epsilon(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    epsilon: float = DEFAULT_EPSILON,
    *,
    relevance: bool = True,
    backend: Optional[str] = None,
    recompute: bool = False,
) -> torch.Tensor:
    """``F.linear`` whose backward is the epsilon rule (relevance view by default)."""
    check_linear(x, weight, bias, epsilon)
    return LinearEpsilonFn.apply(x, weight, bias, epsilon, relevance, pin_backend(backend), recompute)
