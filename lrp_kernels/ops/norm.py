r"""Normalisation rules (docs/math.md; AttnLRP Prop. 3.4).

RMSNorm-identity, ``y = w * x * rstd`` with ``rstd = 1 / sqrt(mean(x^2) + eps)``:

* relevance view: ``R_x = R_y`` (identity);
* gradient view: ``rstd`` is a constant, ``G_x = G_y * w * rstd``.

LayerNorm, ``y = w * (x - mean(x)) * rstd + b``:

* relevance view: epsilon rule on the centring ``c = x - mean(x)``, identity on ``* rstd`` and
  ``* w``, epsilon rule on ``+ b`` (the bias absorbs its share)::

      R_c = (y - b) * R_y / stab(y)
      R_x = x * (R_c / stab(c) - mean(R_c / stab(c)))

* gradient view: ``rstd`` detached, the rest plain gradient:
  ``u = G_y * w * rstd``, ``G_x = u - mean(u)``.

``normalize`` (``x / max(||x||_p, eps)``) uses the identity rule: the norm is a constant.

Kernel ops: ``rms_norm_forward`` -> ``(y, rstd)``, ``rms_norm_rstd`` (``rstd`` alone, where
the module's own forward gives ``y``), ``rms_norm_backward`` (gradient view),
``layer_norm_forward`` -> ``(y, mean, rstd)``, ``layer_norm_backward`` (both views).
Statistics are computed in float32 (or float64 for float64 input).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_same_device, compute_dtype, is_zero, pin_backend,
                      record_backward, record_forward, stabilize)


def rms_norm_forward_torch(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float):
    cd = compute_dtype(x)
    xf = x.to(cd)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight.to(cd)
    return y.to(x.dtype), rstd.squeeze(-1)


def rms_norm_rstd_torch(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rstd = 1 / sqrt(mean(x^2) + eps)`` over the last dim, in float32 or higher."""
    return torch.rsqrt(x.to(compute_dtype(x)).pow(2).mean(-1) + eps)


def rms_norm_backward_torch(grad_y: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor):
    cd = compute_dtype(grad_y, rstd)
    g = grad_y.to(cd) * rstd.to(cd).unsqueeze(-1)
    if weight is not None:
        g = g * weight.to(cd)
    return g.to(grad_y.dtype)


def layer_norm_forward_torch(x, weight, bias, eps):
    cd = compute_dtype(x)
    xf = x.to(cd)
    mu = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mu).pow(2).mean(-1, keepdim=True) + eps)
    y = (xf - mu) * rstd
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype), mu.squeeze(-1), rstd.squeeze(-1)


def layer_norm_backward_torch(grad_y, x, weight, bias, mean, rstd, epsilon, relevance):
    cd = compute_dtype(grad_y, x)
    g, xf = grad_y.to(cd), x.to(cd)
    mu, rs = mean.to(cd).unsqueeze(-1), rstd.to(cd).unsqueeze(-1)
    if not relevance:
        u = g * rs
        if weight is not None:
            u = u * weight.to(cd)
        return (u - u.mean(-1, keepdim=True)).to(x.dtype)
    c = xf - mu
    yb = c * rs  # y - b
    if weight is not None:
        yb = yb * weight.to(cd)
    y = yb + bias.to(cd) if bias is not None else yb
    r_c = yb * g / stabilize(y, epsilon)
    n = r_c / stabilize(c, epsilon)
    return (xf * (n - n.mean(-1, keepdim=True))).to(x.dtype)


dispatch.register("rms_norm_forward", "torch", rms_norm_forward_torch)
dispatch.register("rms_norm_rstd", "torch", rms_norm_rstd_torch)
dispatch.register("rms_norm_backward", "torch", rms_norm_backward_torch)
dispatch.register("layer_norm_forward", "torch", layer_norm_forward_torch)
dispatch.register("layer_norm_backward", "torch", layer_norm_backward_torch)


def _check_norm(x, weight, bias, eps, name="weight"):
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (the normalised last dim)")
    for n, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(n, t)
            if t.shape != (x.shape[-1],):
                raise ValueError(f"{n} must have shape ({x.shape[-1]},) (x's last dim), got {tuple(t.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


class RMSNormIdentityFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, relevance, backend, forward_fn):
        if forward_fn is not None:  # the values of the module's own forward, bit for bit; rstd only
            rstd = dispatch.call("rms_norm_rstd", x, eps, backend=backend)
            y = forward_fn(x)
        else:
            y, rstd = dispatch.call("rms_norm_forward", x, weight, eps, backend=backend)
        ctx.relevance, ctx.backend, ctx.x_dtype = relevance, backend, x.dtype
        ctx.save_for_backward(weight, rstd)
        record_forward(ctx, "rms_norm_identity", (x,), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.relevance:
            gx = grad_y
        else:
            weight, rstd = ctx.saved_tensors
            gx = dispatch.call("rms_norm_backward", grad_y, weight, rstd, backend=ctx.backend)
        record_backward(ctx, (gx,), grad_y, ctx.relevance, True)
        return gx.to(ctx.x_dtype), None, None, None, None, None


def rms_norm_identity(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
                      relevance: bool = True, backend: Optional[str] = None,
                      forward_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """RMSNorm over the last dim with the identity rule.

    ``forward_fn``: the module's own forward, whose values are returned unchanged (a patched
    model then computes exactly what the unpatched one does, in every dtype); the rule uses the
    statistics of ``x`` computed here.
    """
    _check_norm(x, weight, None, eps)
    return RMSNormIdentityFn.apply(x, weight, eps, relevance, pin_backend(backend), forward_fn)


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, epsilon, relevance, backend, forward_fn):
        y, mu, rstd = dispatch.call("layer_norm_forward", x, weight, bias, eps, backend=backend)
        if forward_fn is not None:  # the values of the module's own forward, bit for bit
            y = forward_fn(x)
        ctx.epsilon, ctx.relevance, ctx.backend = epsilon, relevance, backend
        ctx.save_for_backward(x, weight, bias, mu, rstd)
        record_forward(ctx, "layer_norm", (x,), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mu, rstd = ctx.saved_tensors
        gx = dispatch.call("layer_norm_backward", grad_y, x, weight, bias, mu, rstd, ctx.epsilon,
                           ctx.relevance, backend=ctx.backend)
        # epsilon on "+ b": the bias absorbs its share, conservative only without one
        record_backward(ctx, (gx,), grad_y, ctx.relevance, lambda: is_zero(bias))
        return gx.to(x.dtype), None, None, None, None, None, None, None


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, epsilon: float = DEFAULT_EPSILON, *, relevance: bool = True,
               backend: Optional[str] = None,
               forward_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """LayerNorm over the last dim with the mixture rule of docs/math.md (``epsilon`` stabilises
    the rule, ``eps`` is the norm's own variance epsilon). ``forward_fn``: as for
    :func:`rms_norm_identity`, the module's own forward supplies the values."""
    _check_norm(x, weight, bias, eps)
    check_epsilon(epsilon)
    return LayerNormFn.apply(x, weight, bias, eps, epsilon, relevance, pin_backend(backend), forward_fn)


class NormalizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, dim, eps, relevance):
        norm = x.norm(p=p, dim=dim, keepdim=True).clamp_min(eps)
        ctx.relevance = relevance
        ctx.save_for_backward(norm)
        y = x / norm
        record_forward(ctx, "normalize", (x,), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.relevance:
            gx = grad_y
        else:
            (norm,) = ctx.saved_tensors
            gx = grad_y / norm
        record_backward(ctx, (gx,), grad_y, ctx.relevance, True)
        return gx, None, None, None, None


def normalize(x: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, *,
              relevance: bool = True) -> torch.Tensor:
    """``F.normalize`` with the identity rule (the norm is treated as a constant)."""
    check_float("x", x)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}], got {dim}")
    return NormalizeFn.apply(x, p, dim, eps, relevance)
