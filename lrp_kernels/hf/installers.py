"""Gradient-view rules installed on module *instances* (no class is ever modified).

Each ``install_*`` takes the patch context, the module's name and the module, and rebinds that
one instance's forward (``ctx.rebind``) so the forward values are unchanged and the backward is
the SPEC rule in the gradient view (relevance of ``t`` = ``t * t.grad``):

* ``nn.Linear`` (plain forward)      -> :func:`lrp_kernels.ops.grad.linear_epsilon` (the dispatched
  fused kernel) on CUDA; on CPU the same rule as the plain GEMM followed by
  :class:`EpsilonOutputFn` (identical math, keeps only ``z``, not also ``x``)
* GPT-2 ``Conv1D`` (``x @ W + b``)     -> the same, on ``W.T`` (a view, no copy)
* any other module that acts linearly (``nn.Conv*d``, quantised linears such as bitsandbytes
  ``Linear4bit`` / ``Linear8bitLt``, GPTQ/AWQ ``QuantLinear``, subclasses of ``nn.Linear`` with
  their own forward): the epsilon rule for any module, ``G_x = vjp(f, x)(G_y * y / stab(y))``:
  the module's own forward and plain backward, with the incoming gradient scaled by
  ``y / stab(y)`` (:class:`EpsilonOutputFn`), so a dequantising forward is explained exactly as
  the linear map it computes.
* RMSNorm (``w`` or Gemma's ``1 + w``)  -> :func:`lrp_kernels.ops.grad.rms_norm_identity`
* ``nn.LayerNorm``                     -> :func:`lrp_kernels.ops.grad.layer_norm` (std detached)
* element-wise activations            -> :func:`lrp_kernels.ops.grad.identity` (identity rule)
* dropout                             -> the identity function (no dropout while patched)
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..ops import grad
from ..ops._common import compute_dtype, stabilize


class EpsilonOutputFn(torch.autograd.Function):
    """Forward: ``y`` unchanged. Backward: ``G_y * y / stab(y)`` (in fp32 or higher).

    Placed on a module's output, the module's own plain backward then computes the epsilon rule
    for any linear-acting module: ``G_x = vjp(f, x)(G_y * y / stab(y))`` (SPEC, last rows).
    """

    @staticmethod
    def forward(ctx, y, epsilon):
        ctx.epsilon = epsilon
        ctx.save_for_backward(y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        cd = compute_dtype(grad_y, y)
        # y / stab(y) == |y| / (|y| + eps) exactly (y - eps == -(|y| + eps) for y < 0; both 0 at
        # y = 0): four element-wise passes and two temporaries instead of seven and four
        ratio = y.abs() if y.dtype == cd else y.to(cd).abs_()
        ratio.div_(ratio + ctx.epsilon)
        return ratio.mul_(grad_y.to(cd)).to(grad_y.dtype), None


# ---- classification helpers ----------------------------------------------------------------

_TORCH_ELEMENTWISE = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU,
                      nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                      nn.ReLU6, nn.Identity, nn.Softsign, nn.Tanhshrink)


@functools.lru_cache(maxsize=None)
def elementwise_activations() -> tuple[type, ...]:
    """Module classes that get the identity rule: torch's element-wise activations and
    transformers' (the ACT2FN values); imported lazily (transformers is heavy)."""
    return _TORCH_ELEMENTWISE + _hf_activation_classes()


def _hf_activation_classes() -> tuple[type, ...]:
    """transformers' element-wise activation modules (ACT2FN values)."""
    try:
        from transformers import activations as act
    except Exception:  # pragma: no cover
        return ()
    return tuple(c for c in vars(act).values()
                 if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == act.__name__)


def is_elementwise_activation(module: nn.Module) -> bool:
    return isinstance(module, elementwise_activations())


def looks_like_nonlinearity(module: nn.Module) -> bool:
    """A module from torch's or transformers' activation collections that we have no rule for."""
    mod = type(module).__module__
    return mod in ("torch.nn.modules.activation", "transformers.activations") and not is_elementwise_activation(module)


def is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``x @ W + b`` with ``W`` of shape [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Modules that act linearly on their input but are not a plain ``nn.Linear``."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return True
    if isinstance(module, nn.Linear):  # subclass with its own forward (e.g. bnb Linear4bit)
        return True
    return "Linear" in type(module).__name__ and hasattr(module, "weight")


def is_rms_norm(module: nn.Module, extra_names: tuple[str, ...] = ()) -> bool:
    name = type(module).__name__
    return (name.endswith("RMSNorm") or name in extra_names or isinstance(module, getattr(nn, "RMSNorm", ()))) \
        and getattr(module, "weight", None) is not None


def is_dropout(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout))


# ---- installers ----------------------------------------------------------------------------

def _fused(ctx, x: torch.Tensor) -> bool:
    """Use the dispatched linear_epsilon kernel (Triton on CUDA, or a forced non-torch backend);
    on CPU the plain GEMM + output scaling below is the same math and saves less memory."""
    return x.is_cuda or ctx.backend not in (None, "torch")


def install_linear(ctx, name: str, module: nn.Linear) -> None:
    def forward(x):
        if _fused(ctx, x):
            return grad.linear_epsilon(x, module.weight, module.bias, ctx.epsilon, backend=ctx.backend)
        # G_x = (G_z * z / stab(z)) @ W: the plain backward of F.linear (frozen W saves only W)
        # after EpsilonOutputFn (saves z): no copy of x is kept
        return EpsilonOutputFn.apply(torch.nn.functional.linear(x, module.weight, module.bias), ctx.epsilon)
    ctx.rebind(module, lambda orig: forward)


def install_conv1d(ctx, name: str, module: nn.Module) -> None:
    def make(orig):
        def forward(x):
            if _fused(ctx, x):
                return grad.linear_epsilon(x, module.weight.t(), module.bias, ctx.epsilon, backend=ctx.backend)
            return EpsilonOutputFn.apply(orig(x), ctx.epsilon)
        return forward
    ctx.rebind(module, make)


def install_generic_epsilon(ctx, name: str, module: nn.Module) -> None:
    def make(orig):
        def forward(*args, **kwargs):
            return EpsilonOutputFn.apply(orig(*args, **kwargs), ctx.epsilon)
        return forward
    ctx.rebind(module, make)


def rms_norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1e-6


def install_rms_norm(ctx, name: str, module: nn.Module, weight_offset: float = 0.0) -> None:
    """``y = (offset + w) * x * rstd`` with ``rstd`` constant in the backward (identity rule)."""
    eps = rms_norm_eps(module)
    if isinstance(module, getattr(nn, "RMSNorm", ())) and module.eps is None:
        eps = None

    def forward(x):
        w = module.weight
        if weight_offset:
            w = w.float() + weight_offset
        e = torch.finfo(x.dtype).eps if eps is None else eps
        return grad.rms_norm_identity(x, w, e, backend=ctx.backend)
    ctx.rebind(module, lambda orig: forward)


def install_layer_norm(ctx, name: str, module: nn.LayerNorm) -> None:
    if len(module.normalized_shape) != 1:
        raise NotImplementedError(f"{name}: LayerNorm over {module.normalized_shape} (only the last dim is supported)")

    def forward(x):
        return grad.layer_norm(x, module.weight, module.bias, module.eps, ctx.epsilon, backend=ctx.backend)
    ctx.rebind(module, lambda orig: forward)


def install_activation(ctx, name: str, module: nn.Module) -> None:
    def make(orig):
        def forward(x):
            return grad.identity(orig, x, ctx.epsilon, backend=ctx.backend)
        return forward
    ctx.rebind(module, make)


def install_dropout(ctx, name: str, module: nn.Module) -> None:
    ctx.rebind(module, lambda orig: (lambda x, *a, **k: x))


def install_stop_input(ctx, name: str, module: nn.Module) -> None:
    """The module's output is a constant for relevance (used for MoE routers)."""
    def make(orig):
        def forward(x, *args, **kwargs):
            return orig(x.detach(), *args, **kwargs)
        return forward
    ctx.rebind(module, make)


class GatedProductFn(torch.autograd.Function):
    """Forward: ``act(g) * u``. Backward (gradient view): the identity rule on the element-wise
    ``act`` followed by the uniform rule on the product, in one step::

        s = act(g)                      (recomputed, not saved: the plain model keeps it)
        G_u = G_m * s / k               G_g = (G_m * u / k) * s / stab(g)

    ``k = 2`` when both factors need a gradient, else 1 (exactly :func:`grad.mul2` after
    :func:`grad.identity`, with fewer passes and one activation-sized tensor less saved).
    """

    @staticmethod
    def forward(ctx, g, u, act, epsilon):
        ctx.act, ctx.epsilon = act, epsilon
        ctx.save_for_backward(g, u)
        return act(g) * u

    @staticmethod
    def backward(ctx, grad_m):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype(grad_m, g, u)
        with torch.no_grad():
            s = ctx.act(g).to(cd)
        h = grad_m.to(cd) * (0.5 if (need_g and need_u) else 1.0)
        gu = (h * s).to(u.dtype) if need_u else None
        gg = None
        if need_g:
            gg = s.mul_(h.mul_(u.to(cd))).div_(stabilize(g, ctx.epsilon)).to(g.dtype)
        return gg, gu, None, None


def gated_mlp_forward(ctx, module: nn.Module, gate: str = "gate_proj", up: str = "up_proj",
                      down: str = "down_proj", act: str = "act_fn"):
    """``down(act(gate(x)) * up(x))`` with the identity rule on ``act`` and the uniform rule on
    the product (:class:`GatedProductFn`; grad.identity + grad.mul2 for other activations)."""
    g, u, d, a = (getattr(module, n) for n in (gate, up, down, act))
    if not is_elementwise_activation(a):
        def forward(x):
            return d(grad.mul2(a(g(x)), u(x), backend=ctx.backend))
        return forward
    act_fn = a.forward  # the activation's own forward, taken before its identity rule is installed

    def fused(x):
        gx, ux = g(x), u(x)
        if not x.is_cuda and ctx.backend in (None, "torch"):
            return d(GatedProductFn.apply(gx, ux, act_fn, ctx.epsilon))
        return d(grad.mul2(a(gx), ux, backend=ctx.backend))
    return fused


def install_gated_mlp(ctx, name: str, module: nn.Module) -> None:
    ctx.rebind(module, lambda orig: gated_mlp_forward(ctx, module))


def install_nothing(ctx, name: str, module: nn.Module) -> None:
    """Modules with no rule needed in the gradient view (embedding lookups, constants)."""


def softcap_identity(ctx, x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` with the identity rule (element-wise non-linearity)."""
    return grad.identity(lambda t: torch.tanh(t / cap) * cap, x, ctx.epsilon, backend=ctx.backend)


def stop(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach()
