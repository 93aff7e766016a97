r"""Deep-Taylor rule (with bias) for ``s = softmax(x / T)`` (docs/math.md; AttnLRP Prop. 3.1).

Relevance view (sums over the softmax dim)::

    R_x = (x / T) * (R_s - s * sum(R_s))

Gradient view: the plain softmax gradient ``G_x = s * (G_s - sum(s * G_s)) / T``
(substituting ``R_s = s * G_s`` above gives ``R_x = x * G_x``).

Masked logits (``-inf`` or the dtype's minimum) are not part of the softmax: they get exactly
zero relevance, and relevance arriving at them (where ``s = 0``) is ignored, so the row sum runs
over unmasked entries only (every backend does the same). Fully masked rows give zero
relevance, never NaN. One kernel op, ``softmax_dt_backward``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import dispatch
from ._common import (check_float, check_forced_backend, compute_dtype, pin_backend, record_backward,
                      record_forward, stand_in, zero_masked)


def softmax_dt_backward_torch(
    grad_s: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    dim: int,
    temperature: float,
    relevance: bool,
) -> torch.Tensor:
    """Reference backend. ``x`` are the logits before ``/ T``; ``s`` the softmax output."""
    cd = compute_dtype(grad_s, x)
    g, sf = grad_s.to(cd), s.to(cd)
    if relevance:
        g = zero_masked(g, x)  # masked entries are outside the softmax: their R_s is ignored
        out = g - sf * g.sum(dim, keepdim=True)
        xf = x.to(cd)
        xs = torch.where(torch.isneginf(xf), 0.0, xf) / temperature
        out = zero_masked(xs * out, x)
    else:
        out = sf * (g - (sf * g).sum(dim, keepdim=True)) / temperature
        out = zero_masked(out, x)
    # A fully -inf row has s = NaN; all its entries are masked, so zero_masked already made its
    # relevance 0. NaN from anywhere else (NaN logits or relevance) stays visible: never hidden.
    return out.to(x.dtype)


dispatch.register("softmax_dt_backward", "torch", softmax_dt_backward_torch)


class SoftmaxDTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, dtype, temperature, relevance, backend):
        xs = x if temperature == 1.0 else x / temperature
        s = torch.softmax(xs, dim, dtype=dtype)
        ctx.dim, ctx.temperature, ctx.relevance, ctx.backend = dim, temperature, relevance, backend
        ctx.save_for_backward(x, s)
        record_forward(ctx, "softmax", (x,), s)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        x, s = ctx.saved_tensors
        grad_x = dispatch.call("softmax_dt_backward", grad_s, x, s, ctx.dim, ctx.temperature,
                               ctx.relevance, backend=ctx.backend)
        # Deep Taylor with bias absorbs relevance: not conservative (docs/math.md)
        record_backward(ctx, (grad_x,), grad_s, ctx.relevance, False)
        return grad_x, None, None, None, None, None


def softmax(
    x: torch.Tensor,
    dim: int,
    dtype: Optional[torch.dtype] = None,
    temperature: float = 1.0,
    *,
    relevance: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``torch.softmax(x / temperature, dim, dtype)`` with the Deep-Taylor backward."""
    check_float("x", x)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int (the softmax dimension), got {type(dim).__name__} {dim!r}")
    if not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = pin_backend(backend)
    dim = dim % max(x.dim(), 1)
    s_like = stand_in(x if dtype is None else x.new_empty((), dtype=dtype), x.shape)
    check_forced_backend("softmax_dt_backward", backend, s_like, x, s_like, dim, float(temperature), relevance)
    return SoftmaxDTFn.apply(x, dim, dtype, float(temperature), relevance, backend)
