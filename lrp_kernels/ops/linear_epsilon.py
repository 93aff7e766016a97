r"""Epsilon rule for a linear layer ``z = x @ W.T + b`` (docs/math.md; AttnLRP Eq. 8).

Relevance view::

    R_x = x * ((R_z / stab(z)) @ W)

Gradient view::

    G_x = (G_z * z / stab(z)) @ W

Both are one kernel op, ``linear_epsilon_backward``: the left operand of the GEMM is
``grad_z / stab(z)`` (times ``z`` in the gradient view) and the result is multiplied by ``x``
in the relevance view. The weight and bias receive no relevance (they are parameters). The
gradient view keeps only ``z`` for the backward (not ``x``): the memory of a plain
frozen-weight linear plus its output.

The same rule holds for any module ``f`` that acts linearly on its input (convolutions,
quantised linears): ``G_x = vjp(f, x)(G_y * y / stab(y))``, the module's own plain backward
after the output scaling of :func:`epsilon_scale` (:func:`epsilon_module`, kernel op
``epsilon_output_backward``). :func:`epsilon_scale` is the output side of every epsilon rule
in the package (also the VJP rules of :mod:`lrp_kernels.explicit.rules`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_same_device,
                      check_same_dtype, compute_dtype, is_zero, pin_backend, record_backward, record_forward,
                      record_module, stab_ratio, stabilize)


def epsilon_scale(grad_y: torch.Tensor, y: torch.Tensor, epsilon: float, relevance: bool,
                  share: float = 1.0) -> torch.Tensor:
    """The output side of the epsilon rule, in float32 or higher.

    Relevance view ``R_y / (share * stab(y))``; gradient view ``G_y * y / (share * stab(y))``
    (``share`` = number of inputs splitting the relevance, for the uniform-epsilon rules).
    With ``epsilon = 0``, exactly 0 where ``y == 0`` (no NaN).
    """
    cd = compute_dtype(grad_y, y)
    g, yc = grad_y.to(cd), y.to(cd)
    if not relevance and epsilon > 0:
        h = stab_ratio(yc, epsilon).mul_(g)
        return h.div_(share) if share != 1 else h
    den = stabilize(yc, epsilon)
    if share != 1:
        den = den * share
    h = g / den
    if epsilon == 0:
        h = torch.where(den == 0, torch.zeros((), dtype=cd, device=h.device), h)
    return h if relevance else h * yc


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
    out = epsilon_scale(grad_z, z, epsilon, relevance).to(cd) @ weight.to(cd)
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
        ctx.x_shape = x.shape
        # recompute=True saves memory at long context: z is rebuilt in the backward (from x).
        # The gradient view needs x only then: a plain frozen linear keeps no more.
        keep_x = relevance or recompute
        ctx.save_for_backward(x if keep_x else None, weight, bias, None if recompute else z)
        record_forward(ctx, "linear_epsilon", (x,), z)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight, bias, z = ctx.saved_tensors
        if x is None:  # stands for x where only its shape, dtype and device are read
            x = weight.new_empty(()).expand(ctx.x_shape)
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


def linear_epsilon_backward(grad_z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], z: Optional[torch.Tensor], epsilon: float,
                            relevance: bool, *, backend: Optional[str] = None) -> torch.Tensor:
    """The rule's backward alone (for rules that run their own autograd, e.g. Zennit-style
    hooks): ``R_x`` or ``G_x`` from ``grad_z``; ``z=None`` recomputes ``z``."""
    return dispatch.call("linear_epsilon_backward", grad_z, x, weight, bias, z, epsilon, relevance,
                         backend=backend)


# ---- any linear-acting module: the module's own backward after the output scaling ----------

def epsilon_output_backward_torch(grad_y: torch.Tensor, y: torch.Tensor, epsilon: float,
                                  share: float = 1.0) -> torch.Tensor:
    """``G_y * y / (share * stab(y))`` in ``grad_y``'s dtype."""
    return epsilon_scale(grad_y, y, epsilon, relevance=False, share=share).to(grad_y.dtype)


dispatch.register("epsilon_output_backward", "torch", epsilon_output_backward_torch)


class EpsilonOutputFn(torch.autograd.Function):
    """Forward: ``y`` unchanged. Backward: ``G_y * y / (share * stab(y))``, so that the producing
    module's own plain backward completes the epsilon rule (gradient view; ``share = 2`` for the
    uniform-epsilon rule of a product of two inputs)."""

    @staticmethod
    def forward(ctx, y, epsilon, backend, share=1.0):
        ctx.epsilon, ctx.backend, ctx.share = epsilon, backend, share
        ctx.save_for_backward(y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        g = dispatch.call("epsilon_output_backward", grad_y, y, ctx.epsilon, ctx.share, backend=ctx.backend)
        return g, None, None, None


def epsilon_module(fn, x: torch.Tensor, epsilon: float = DEFAULT_EPSILON, *, backend: Optional[str] = None,
                   has_bias: bool = True, name: str = "epsilon_module") -> torch.Tensor:
    """``fn(x)`` for a module ``fn`` that acts linearly on ``x``, with the epsilon rule in the
    gradient view: ``G_x = vjp(fn, x)(G_y * y / stab(y))`` (exact for any linear map, e.g. a
    convolution or a dequantising linear). ``has_bias``: whether ``fn`` adds a constant (then
    the conservation check does not expect conservation)."""
    check_epsilon(epsilon)
    backend = pin_backend(backend)
    return record_module(name, lambda t: EpsilonOutputFn.apply(fn(t), epsilon, backend), (x,),
                         expected=not has_bias)
