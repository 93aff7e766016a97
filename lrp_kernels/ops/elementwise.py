r"""Element-wise rules: epsilon add, uniform product, epsilon mean, identity, stop (docs/math.md).

==================  ==================================  ======================================
rule                relevance view                      gradient view
==================  ==================================  ======================================
add ``z = a + b``   ``R_a = a * R_z / stab(z)``         ``G_a = G_z * z / stab(z)``
mul ``z = a * b``   ``R_a = R_b = R_z / 2``             ``G_a = G_z * b / 2``
                    (``R_a = R_z`` if ``b`` constant)   (``G_z * b`` if ``b`` constant)
mean over dim       ``R_x = x * expand(R_z/stab(z))/n`` ``G_x = expand(G_z * z / stab(z)) / n``
identity ``y=f(x)`` ``R_x = R_y``                       ``G_x = G_y * y / stab(x)``
gated ``act(g)*u``  identity on ``act``, then uniform   (the same, fused: :func:`gated_product`)
stop                ``R_x = 0``                         detach
==================  ==================================  ======================================

In each, the relevance view is the gradient view times the input (one extra multiply):
``R_t = t * G_t`` with ``R_z = z * G_z``. The Functions below compute the gradient-view
factor once and multiply by the input when ``relevance`` is set.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_same_device,
                      compute_dtype, is_zero, pin_backend, record_backward, record_forward,
                      stabilize)
from .linear_epsilon import epsilon_factor_gradient_torch


def _reduce_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast result back to ``like``'s shape and dtype."""
    return t.sum_to_size(like.shape).to(like.dtype)


# ---- epsilon add ---------------------------------------------------------------------------

def add_epsilon_backward_torch(grad_z, inputs: Sequence[torch.Tensor], z, epsilon, relevance, needs):
    cd = compute_dtype(grad_z, z)
    g = grad_z.to(cd) / stabilize(z, epsilon)
    if relevance:
        return [(_reduce_to(t.to(cd) * g, t) if need else None) for t, need in zip(inputs, needs)]
    g = g * z.to(cd)
    return [(_reduce_to(g, t) if need else None) for t, need in zip(inputs, needs)]


dispatch.register("add_epsilon_backward", "torch", add_epsilon_backward_torch)


class AddEpsilonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, epsilon, relevance, backend, *inputs):
        z = inputs[0]
        for t in inputs[1:]:
            z = z + t
        ctx.epsilon, ctx.relevance, ctx.backend = epsilon, relevance, backend
        ctx.save_for_backward(z, *inputs)
        record_forward(ctx, "add", inputs, z)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        z, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        grads = dispatch.call("add_epsilon_backward", grad_z, inputs, z, ctx.epsilon, ctx.relevance,
                              needs, backend=ctx.backend)
        # a constant (no-grad) summand absorbs its share, like a bias: conservative only if zero
        record_backward(ctx, tuple(grads), grad_z, ctx.relevance,
                        lambda: all(need or is_zero(t) for t, need in zip(inputs, needs)))
        return (None, None, None, *grads)


def add(*inputs: torch.Tensor, epsilon: float = DEFAULT_EPSILON, relevance: bool = True,
        backend: Optional[str] = None) -> torch.Tensor:
    """Sum of n broadcastable tensors with the epsilon rule."""
    if len(inputs) < 2:
        raise ValueError(f"add needs at least two tensors, got {len(inputs)}")
    for i, t in enumerate(inputs):
        check_float(f"input {i}", t)
    check_same_device(**{f"input {i}": t for i, t in enumerate(inputs)})
    check_epsilon(epsilon)
    try:
        torch.broadcast_shapes(*(t.shape for t in inputs))
    except RuntimeError:
        raise ValueError(f"inputs must broadcast together, got shapes {[tuple(t.shape) for t in inputs]}") from None
    return AddEpsilonFn.apply(epsilon, relevance, pin_backend(backend), *inputs)


# ---- uniform product -----------------------------------------------------------------------

def mul_uniform_backward_torch(grad_z, a, b, relevance, need_a, need_b):
    cd = compute_dtype(grad_z, a, b)
    g = grad_z.to(cd) / (2.0 if (need_a and need_b) else 1.0)
    if relevance:
        # R_z = z * G_z in the relevance view: each factor gets the (split) incoming relevance
        ga = _reduce_to(g, a) if need_a else None
        gb = _reduce_to(g, b) if need_b else None
    else:
        ga = _reduce_to(g * b.to(cd), a) if need_a else None
        gb = _reduce_to(g * a.to(cd), b) if need_b else None
    return ga, gb


dispatch.register("mul_uniform_backward", "torch", mul_uniform_backward_torch)


class MulUniformFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, relevance, backend):
        ctx.relevance, ctx.backend = relevance, backend
        ctx.save_for_backward(a, b)
        z = a * b
        record_forward(ctx, "mul", (a, b), z)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        a, b = ctx.saved_tensors
        ga, gb = dispatch.call("mul_uniform_backward", grad_z, a, b, ctx.relevance,
                               ctx.needs_input_grad[0], ctx.needs_input_grad[1], backend=ctx.backend)
        record_backward(ctx, (ga, gb), grad_z, ctx.relevance, True)
        return ga, gb, None, None


def mul(a: torch.Tensor, b: torch.Tensor, *, relevance: bool = True,
        backend: Optional[str] = None) -> torch.Tensor:
    """``a * b`` with the uniform rule; a factor that needs no grad is a constant."""
    check_float("a", a)
    check_float("b", b)
    check_same_device(a=a, b=b)
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"a and b must broadcast, got {tuple(a.shape)} and {tuple(b.shape)}") from None
    return MulUniformFn.apply(a, b, relevance, pin_backend(backend))


# ---- epsilon mean --------------------------------------------------------------------------

def mean_epsilon_backward_torch(grad_z, x, z, dim, keepdim, epsilon, relevance):
    cd = compute_dtype(grad_z, x)
    g = grad_z.to(cd) / stabilize(z, epsilon)
    if not relevance:
        g = g * z.to(cd)
    # a 0-d x has nothing to expand (torch lets dim be 0 or -1 there)
    dims = () if x.dim() == 0 else (tuple(d % x.dim() for d in dim) if dim is not None else tuple(range(x.dim())))
    if not keepdim:
        for d in sorted(dims):
            g = g.unsqueeze(d)
    n = 1
    for d in dims:
        n *= x.shape[d]
    g = g.expand(x.shape) / n
    if relevance:
        g = g * x.to(cd)
    return g.to(x.dtype)


dispatch.register("mean_epsilon_backward", "torch", mean_epsilon_backward_torch)


class MeanEpsilonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, keepdim, epsilon, relevance, backend):
        # dim=None reduces every dim; keepdim then keeps them all as size 1 (as torch.mean)
        z = x.mean(dim=dim, keepdim=keepdim)
        ctx.dim, ctx.keepdim, ctx.epsilon, ctx.relevance, ctx.backend = dim, keepdim, epsilon, relevance, backend
        ctx.save_for_backward(x, z)
        record_forward(ctx, "mean", (x,), z)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, z = ctx.saved_tensors
        gx = dispatch.call("mean_epsilon_backward", grad_z, x, z, ctx.dim, ctx.keepdim, ctx.epsilon,
                           ctx.relevance, backend=ctx.backend)
        record_backward(ctx, (gx,), grad_z, ctx.relevance, True)
        return gx, None, None, None, None, None


def mean(x: torch.Tensor, dim=None, keepdim: bool = False, epsilon: float = DEFAULT_EPSILON, *,
         relevance: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """``x.mean(dim, keepdim)`` with the epsilon rule."""
    check_float("x", x)
    check_epsilon(epsilon)
    if isinstance(dim, int):
        dim = (dim,)
    if dim is not None:
        dim = tuple(dim)
        for d in dim:
            if not isinstance(d, int) or not -max(x.dim(), 1) <= d < max(x.dim(), 1):
                raise ValueError(f"dim {d!r} out of range for x of shape {tuple(x.shape)}")
        if len({d % max(x.dim(), 1) for d in dim}) != len(dim):
            raise ValueError(f"dim must not repeat a dimension, got {dim}")
        if not dim:  # torch.mean reduces every dim for an empty dim list
            dim = None
    return MeanEpsilonFn.apply(x, dim, keepdim, epsilon, relevance, pin_backend(backend))


# ---- identity ------------------------------------------------------------------------------

def identity_backward_torch(grad_y, x, y, epsilon, relevance):
    if relevance:
        return grad_y.to(x.dtype)
    cd = compute_dtype(grad_y, x)
    return (grad_y.to(cd) * y.to(cd) / stabilize(x, epsilon)).to(x.dtype)


dispatch.register("identity_backward", "torch", identity_backward_torch)


class IdentityFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x, epsilon, relevance, backend):
        y = fn(x)
        if y.shape != x.shape:
            raise ValueError(f"identity rule needs an element-wise fn (same shape out), "
                             f"got {tuple(x.shape)} -> {tuple(y.shape)}")
        ctx.epsilon, ctx.relevance, ctx.backend = epsilon, relevance, backend
        ctx.save_for_backward(x, y)
        record_forward(ctx, "identity", (x,), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y = ctx.saved_tensors
        gx = dispatch.call("identity_backward", grad_y, x, y, ctx.epsilon, ctx.relevance, backend=ctx.backend)
        record_backward(ctx, (gx,), grad_y, ctx.relevance, True)
        return None, gx, None, None, None


def identity(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, epsilon: float = DEFAULT_EPSILON,
             *, relevance: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """``fn(x)`` for an element-wise ``fn`` (SiLU, GELU, tanh, ...) with the identity rule."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    check_float("x", x)
    check_epsilon(epsilon)
    return IdentityFn.apply(fn, x, epsilon, relevance, pin_backend(backend))


# ---- gated product act(g) * u (gated MLPs): identity rule on act, uniform rule on the product --

# Elements per block of the gated product's backward: its three temporaries (act(g), the scaled
# gradient, stab(g)) then cost a few MiB instead of three MLP activations each at the peak.
GATED_BACKWARD_BLOCK = 1 << 18

# Activations whose formula a fused backward may recompute itself (activation_kind); any other
# element-wise callable runs on the torch path.
_ACTIVATION_CLASSES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh",
                       "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                       "GELUPytorchTanh": "gelu_tanh"}


def activation_kind(act: Callable) -> Optional[str]:
    """``"silu"`` / ``"gelu_tanh"`` for an activation whose formula is known (``F.silu``,
    ``nn.SiLU``, ``nn.GELU(approximate="tanh")``, transformers' tanh-GELU classes, or their bound
    ``forward``), else ``None``."""
    if act is torch.nn.functional.silu:
        return "silu"
    module = getattr(act, "__self__", act)  # a bound forward -> its module
    if isinstance(module, torch.nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else None
    cls = type(module)
    if cls.__module__.startswith(("torch.nn.", "transformers.activations")):  # not a user's look-alike
        return _ACTIVATION_CLASSES.get(cls.__name__)
    return None


def _producer_factor(z: torch.Tensor, producer_epsilon: float, cd: torch.dtype) -> torch.Tensor:
    """``z / stab(z)`` of the epsilon linear that produced ``z``, as ``1 - q``
    (:func:`lrp_kernels.ops.linear_epsilon.epsilon_factor_gradient_torch`)."""
    return epsilon_factor_gradient_torch(z, producer_epsilon, cd).neg_().add_(1.0)


def _gated_product_backward_block(grad_m, g, u, act, epsilon, k, gg, gu, producer_epsilon):
    cd = compute_dtype(grad_m, g, u)
    with torch.no_grad():
        s = act(g).to(cd)
    h = grad_m.to(cd) * k
    if gu is not None:
        hs = h * s
        gu.copy_(hs.mul_(_producer_factor(u, producer_epsilon, cd)) if producer_epsilon else hs)
    if gg is not None:
        out = s.mul_(h.mul_(u.to(cd))).div_(stabilize(g, epsilon))
        gg.copy_(out.mul_(_producer_factor(g, producer_epsilon, cd)) if producer_epsilon else out)


def gated_product_backward_torch(grad_m, g, u, act, epsilon, need_g, need_u, producer_epsilon=0.0, act_kind=None):
    """Gradient view, one step: ``s = act(g)`` (recomputed: the plain model keeps it anyway),
    ``G_u = G_m * s / k``, ``G_g = (G_m * u / k) * s / stab(g)``; ``k = 2`` if both need it.
    ``producer_epsilon > 0``: ``g`` and ``u`` came from epsilon linears whose output rescale
    ``z / stab(z)`` is applied here too (their own backward is then the plain GEMM).

    Same-shape contiguous inputs run in blocks of :data:`GATED_BACKWARD_BLOCK` elements (``act``
    is element-wise), so only the two results are activation-sized. ``act_kind`` is for the
    fused kernels (this path calls ``act``)."""
    k = 0.5 if (need_g and need_u) else 1.0
    if not (g.shape == u.shape == grad_m.shape and all(t.is_contiguous() for t in (grad_m, g, u))):
        # broadcast or strided inputs: one block over the broadcast shape, reduced to each input
        shape = torch.broadcast_shapes(grad_m.shape, g.shape, u.shape)
        full = [t.expand(shape).contiguous() for t in (grad_m, g, u)]
        gg = torch.empty(shape, dtype=g.dtype, device=g.device) if need_g else None
        gu = torch.empty(shape, dtype=u.dtype, device=u.device) if need_u else None
        _gated_product_backward_block(*full, act, epsilon, k, gg, gu, producer_epsilon)
        return (_reduce_to(gg, g) if need_g else None), (_reduce_to(gu, u) if need_u else None)
    gg = torch.empty_like(g) if need_g else None
    gu = torch.empty_like(u) if need_u else None
    flat = [t.view(-1) if t is not None else None for t in (grad_m, g, u, gg, gu)]
    for start in range(0, g.numel(), GATED_BACKWARD_BLOCK):
        block = [t[start:start + GATED_BACKWARD_BLOCK] if t is not None else None for t in flat]
        _gated_product_backward_block(*block[:3], act, epsilon, k, *block[3:], producer_epsilon)
    return gg, gu


dispatch.register("gated_product_backward", "torch", gated_product_backward_torch)


class GatedProductFn(torch.autograd.Function):
    """Forward ``act(g) * u``; backward exactly :func:`identity` on ``act`` followed by
    :func:`mul` (gradient view), with fewer passes and no activation-sized tensor saved."""

    @staticmethod
    def forward(ctx, g, u, act, epsilon, backend, producer_epsilon=0.0, act_kind=None):
        ctx.act, ctx.epsilon, ctx.backend = act, epsilon, backend
        ctx.producer_epsilon, ctx.act_kind = producer_epsilon, act_kind
        ctx.save_for_backward(g, u)
        m = act(g) * u
        record_forward(ctx, "gated_product", (g, u), m)
        return m

    @staticmethod
    def backward(ctx, grad_m):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gg, gu = dispatch.call("gated_product_backward", grad_m, g, u, ctx.act, ctx.epsilon, need_g, need_u,
                               ctx.producer_epsilon, ctx.act_kind, backend=ctx.backend)
        # with the producers' rescale folded in, the product alone is not what conserves
        record_backward(ctx, (gg, gu), grad_m, False, not ctx.producer_epsilon)
        return gg, gu, None, None, None, None, None


def gated_product(g: torch.Tensor, u: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
                  epsilon: float = DEFAULT_EPSILON, *, backend: Optional[str] = None,
                  producer_epsilon: float = 0.0) -> torch.Tensor:
    """``act(g) * u`` for an element-wise ``act`` (a gated MLP's product), gradient view: the
    identity rule on ``act`` and the uniform rule on the product.

    ``producer_epsilon``: ``g`` and ``u`` are the outputs of two *plain* linears that stand for
    epsilon-rule linears with this epsilon: their output rescale ``z / stab(z)`` runs in this
    backward's pass, so their own backward is just the GEMM (what
    :func:`lrp_kernels.patch` does for gated MLPs where a fused kernel serves this op; the
    result equals :func:`~lrp_kernels.ops.grad.linear_epsilon` on both followed by this rule)."""
    if not callable(act):
        raise TypeError(f"act must be callable, got {type(act).__name__}")
    check_float("g", g)
    check_float("u", u)
    check_same_device(g=g, u=u)
    check_epsilon(epsilon)
    check_epsilon(producer_epsilon, "producer_epsilon")
    return GatedProductFn.apply(g, u, act, epsilon, pin_backend(backend), float(producer_epsilon),
                                activation_kind(act))


# ---- stop ----------------------------------------------------------------------------------

def stop_relevance(x: torch.Tensor) -> torch.Tensor:
    """The same values, no relevance (and no gradient) flows back to ``x``."""
    check_float("x", x)
    return x.detach()
