r"""Epsilon rule for a linear layer ``z = x @ W.T + b`` (docs/math.md; AttnLRP Eq. 8).

Relevance view::

    R_x = x * ((R_z / stab(z)) @ W)

Gradient view::

    G_x = (G_z * z / stab(z)) @ W

Both are one kernel op, ``linear_epsilon_backward``: the left operand of the GEMM is
``grad_z / stab(z)`` (times ``z`` in the gradient view) and the result is multiplied by ``x``
in the relevance view. The torch backend computes it as an element-wise rescale of ``grad_z``
by :func:`epsilon_factor` of ``z`` (computed in the forward) followed by the platform GEMM
(kernel op ``linear_epsilon_backward_factored``); the fused Triton kernel does both in one
GEMM. The weight and bias receive no relevance (they are parameters). The
gradient view keeps only the factor of ``z`` for the backward (not ``x``, not ``z``): the
memory of a plain frozen-weight linear plus one output-sized tensor.

The same rule holds for any module ``f`` that acts linearly on its input (convolutions,
quantised linears): ``G_x = vjp(f, x)(G_y * y / stab(y))``, the module's own plain backward
after the output scaling (:func:`epsilon_module`, :func:`rescale_output_gradient`, kernel op
``epsilon_output_backward``). :func:`epsilon_scale` is the output side of every epsilon rule
in the package (also the VJP rules of :mod:`lrp_kernels.explicit.rules`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_same_device,
                      check_same_dtype, compute_dtype, is_zero, pin_backend, record_backward, record_forward,
                      record_module, stabilize, stand_in)


def epsilon_factor(z: torch.Tensor, epsilon: float, relevance: bool,
                   dtype: Optional[torch.dtype] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """All the epsilon rule needs of an output ``z``, computed once.

    Relevance view ``1 / stab(z)`` (float32 or higher). Gradient view ``q = eps / (|z| + eps)``,
    i.e. ``z / stab(z) = 1 - q``, kept in ``dtype`` (default: ``z``'s): as compact as ``z`` and
    precise where it matters (``q`` is tiny wherever ``z / stab(z)`` is close to 1); the kernel
    op ``epsilon_factor_gradient`` (one pass in C++ on CPU). With ``epsilon = 0`` the rule's
    factor is exactly 0 where ``z == 0`` (no NaN).
    """
    cd = compute_dtype(z)
    if relevance:
        den = stabilize(z, epsilon)
        inv = den.reciprocal()
        return torch.where(den == 0, torch.zeros((), dtype=cd, device=z.device), inv) if epsilon == 0 else inv
    if epsilon == 0:
        return (z == 0).to(dtype or z.dtype)
    return dispatch.call("epsilon_factor_gradient", z, float(epsilon), dtype or z.dtype, backend=backend)


def epsilon_factor_gradient_torch(z: torch.Tensor, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """``q = eps / (|z| + eps)`` in ``dtype``, computed in float32 or higher (``epsilon > 0``)."""
    cd = compute_dtype(z)
    a = z.abs() if z.dtype == cd else z.to(cd).abs_()
    return torch.reciprocal(a.div_(epsilon).add_(1.0)).to(dtype)


dispatch.register("epsilon_factor_gradient", "torch", epsilon_factor_gradient_torch)


def apply_epsilon_factor(grad: torch.Tensor, factor: torch.Tensor, relevance: bool,
                         share: float = 1.0) -> torch.Tensor:
    """``R / (share * stab(z))`` or ``G * z / (share * stab(z))`` from :func:`epsilon_factor`
    (float32 or higher)."""
    cd = compute_dtype(grad, factor)
    f = factor.to(cd)
    h = grad.to(cd) * (f if relevance else 1.0 - f)
    return h.div_(share) if share != 1 else h


def epsilon_scale(grad_y: torch.Tensor, y: torch.Tensor, epsilon: float, relevance: bool,
                  share: float = 1.0) -> torch.Tensor:
    """The output side of the epsilon rule, in float32 or higher: relevance view
    ``R_y / (share * stab(y))``, gradient view ``G_y * y / (share * stab(y))`` (``share`` =
    number of inputs splitting the relevance, for the uniform-epsilon rules)."""
    cd = compute_dtype(grad_y, y)
    return apply_epsilon_factor(grad_y, epsilon_factor(y.to(cd), epsilon, relevance), relevance, share)


def linear_epsilon_backward_factored(grad_z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     factor: torch.Tensor, relevance: bool, *,
                                     scale_backend: Optional[str] = None) -> torch.Tensor:
    """The rescale + platform GEMM form: ``(grad_z * factor) @ W`` (times ``x``, relevance view).
    ``scale_backend``: the backend of the rescale (op ``epsilon_output_backward``, gradient view)."""
    cd = compute_dtype(grad_z, x, weight)
    if not relevance and grad_z.dtype == cd:  # the dispatched one-pass rescale (C++ on CPU)
        scaled = dispatch.call("epsilon_output_backward", grad_z, factor, 1.0, backend=scale_backend)
    else:
        scaled = apply_epsilon_factor(grad_z, factor, relevance)
    out = scaled.to(cd) @ weight.to(cd)
    if relevance:
        out = out * x.to(cd)
    return out.to(x.dtype)


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
    factor = epsilon_factor(z, epsilon, relevance, compute_dtype(grad_z, x, weight))
    return linear_epsilon_backward_factored(grad_z, x, weight, factor, relevance)


dispatch.register("linear_epsilon_backward", "torch", linear_epsilon_backward_torch)
dispatch.register("linear_epsilon_backward_factored", "torch", linear_epsilon_backward_factored)


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
    """Forward: ``F.linear``. Backward: the epsilon rule in the chosen view.

    Saved for the backward, by the backend the dispatcher picks at forward time:

    * ``torch`` (rescale + platform GEMM): only :func:`epsilon_factor` of ``z`` (``z``-sized)
      and, in the relevance view, ``x``: the gradient view keeps what a plain frozen linear
      keeps plus one output-sized tensor, and an in-place successor (``ReLU(inplace=True)``,
      ``out += ...``) cannot change what the rule uses. With ``share_output=True`` it keeps
      ``z`` itself instead (the factor is formed in the backward): no memory at all when the
      next op saves ``z`` anyway (a gated MLP's product), but ``z`` must then not be modified
      in place;
    * a fused kernel (``triton``, when forced): ``z`` (and ``x`` in the relevance view);
    * ``recompute=True``: ``x`` only, ``z`` is rebuilt in the backward (long contexts).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon, relevance, backend, recompute, share_output=False):
        z = torch.nn.functional.linear(x, weight, bias)
        ctx.epsilon, ctx.relevance, ctx.backend, ctx.recompute = epsilon, relevance, backend, recompute
        ctx.x_shape = x.shape
        z_like = stand_in(z, z.shape)  # grad_z and z as the backward's kernel would get them
        ctx.factored = not recompute and dispatch.chosen_backend(
            "linear_epsilon_backward", z_like, x, weight, bias, z_like, epsilon, relevance, backend=backend) == "torch"
        ctx.saved_output = ctx.factored and share_output
        keep_x = relevance or recompute
        if ctx.factored and not share_output:
            saved = epsilon_factor(z, epsilon, relevance)
        else:
            saved = None if recompute else z
        ctx.save_for_backward(x if keep_x else None, weight, bias, saved)
        record_forward(ctx, "linear_epsilon", (x,), z)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight, bias, saved = ctx.saved_tensors
        if x is None:  # stands for x where only its shape, dtype and device are read
            x = stand_in(weight, ctx.x_shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.factored:
                factor = epsilon_factor(saved, ctx.epsilon, ctx.relevance) if ctx.saved_output else saved
                grad_x = dispatch.call("linear_epsilon_backward_factored", grad_z, x, weight, factor, ctx.relevance,
                                       backend=ctx.backend, scale_backend=ctx.backend)
            else:
                grad_x = dispatch.call("linear_epsilon_backward", grad_z, x, weight, bias, saved,
                                       ctx.epsilon, ctx.relevance, backend=ctx.backend)
            # conservative only without a bias (the bias absorbs its share)
            record_backward(ctx, (grad_x,), grad_z, ctx.relevance, lambda: is_zero(bias))
        return grad_x, None, None, None, None, None, None, None


def linear_epsilon(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    epsilon: float = DEFAULT_EPSILON,
    *,
    relevance: bool = True,
    backend: Optional[str] = None,
    recompute: bool = False,
    share_output: bool = False,
) -> torch.Tensor:
    """``F.linear`` whose backward is the epsilon rule (relevance view by default).

    ``recompute``: keep only ``x`` and rebuild ``z`` in the backward; ``share_output``: keep
    ``z`` itself (see :class:`LinearEpsilonFn` for what each keeps)."""
    check_linear(x, weight, bias, epsilon)
    return LinearEpsilonFn.apply(x, weight, bias, epsilon, relevance, pin_backend(backend), recompute, share_output)


def linear_epsilon_backward(grad_z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], z: Optional[torch.Tensor], epsilon: float,
                            relevance: bool, *, backend: Optional[str] = None) -> torch.Tensor:
    """The rule's backward alone (for rules that run their own autograd, e.g. Zennit-style
    hooks): ``R_x`` or ``G_x`` from ``grad_z``; ``z=None`` recomputes ``z``."""
    return dispatch.call("linear_epsilon_backward", grad_z, x, weight, bias, z, epsilon, relevance,
                         backend=backend)


# ---- any linear-acting module: the module's own backward after the output scaling ----------

def epsilon_output_backward_torch(grad_y: torch.Tensor, factor: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """``G_y * y / (share * stab(y))`` from :func:`epsilon_factor` of ``y``, in ``grad_y``'s dtype."""
    return apply_epsilon_factor(grad_y, factor, relevance=False, share=share).to(grad_y.dtype)


dispatch.register("epsilon_output_backward", "torch", epsilon_output_backward_torch)


def rescale_output_gradient(y: torch.Tensor, epsilon: float, *, backend: Optional[str] = None,
                            share: float = 1.0) -> torch.Tensor:
    """``y`` itself, whose incoming gradient will be scaled by ``y / (share * stab(y))``: the
    producing function's own plain backward then completes the epsilon rule (gradient view).

    A tensor hook, not a new autograd node: ``y`` stays the producer's output (no view), so
    in-place successors (``out += ...``) work, and the factor is taken from ``y`` now, before
    any of them can change it.
    """
    if y.requires_grad:
        factor = epsilon_factor(y.detach(), epsilon, relevance=False, backend=backend)
        y.register_hook(lambda g: dispatch.call("epsilon_output_backward", g, factor, share, backend=backend))
    return y


def epsilon_module(fn, x: torch.Tensor, epsilon: float = DEFAULT_EPSILON, *, backend: Optional[str] = None,
                   has_bias: bool = True, name: str = "epsilon_module") -> torch.Tensor:
    """``fn(x)`` for a module ``fn`` that acts linearly on ``x``, with the epsilon rule in the
    gradient view: ``G_x = vjp(fn, x)(G_y * y / stab(y))`` (exact for any linear map, e.g. a
    convolution or a dequantising linear). ``has_bias``: whether ``fn`` adds a constant (then
    the conservation check does not expect conservation)."""
    check_epsilon(epsilon)
    backend = pin_backend(backend)
    return record_module(name, fn, (x,), expected=not has_bias,
                         then=lambda y: rescale_output_gradient(y, epsilon, backend=backend))
