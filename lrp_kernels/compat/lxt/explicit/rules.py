"""LXT's rules for whole modules (``lxt.explicit.rules``) on :mod:`lrp_kernels.explicit.rules`.

Each rule wraps an ``nn.Module`` *or a plain function* (LXT accepts both; ours wraps modules,
so a function is put in a :class:`~lrp_kernels.compat.lxt._conventions.CallableModule`).
LXT's defaults and conventions:

* ``EpsilonRule(module, epsilon=1e-8)`` (ours: ``1e-6``), ``UniformEpsilonRule(module,
  epsilon=1e-6)``, both with LXT's stabiliser ``y + eps`` (ours keeps the sign).
* ``UniformRule`` splits over *every* tensor input (ours: over the inputs that receive
  relevance, so a constant input takes no share).
* ``TaylorDecompositionRule(module, ref=0, bias=False, distribute_bias=None)``: LXT's argument
  order and default ``bias=False``; the Jacobian is taken *at the reference point*, as in LXT
  (ours, ``bias=True`` by default, takes it at the input).
* :func:`epsilon_lrp` / :func:`identity` and ``epsilon_lrp_fn.apply`` / ``identity_fn.apply``:
  the rules as one-off function calls.

Rules are subclasses of ours (``isinstance(rule, lrp_kernels.explicit.rules.Rule)``), so both
Composites treat them as rules; a user's own ``WrapModule`` subclass that overrides ``forward``
keeps working.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ....explicit import rules as _rules
from .._conventions import as_module, function_class, lxt_stabiliser, scale_relevance

__all__ = ["WrapModule", "EpsilonRule", "UniformEpsilonRule", "UniformRule", "IdentityRule",
           "StopRelevanceRule", "TaylorDecompositionRule", "epsilon_lrp", "identity"]


class WrapModule(_rules.Rule):
    """LXT's base class of the rules: holds ``module`` (an ``nn.Module`` or a function)."""

    def __init__(self, module: Union[nn.Module, Callable]) -> None:
        _rules.Rule.__init__(self, as_module(module))


class EpsilonRule(WrapModule, _rules.EpsilonRule):
    """Epsilon-LRP through any module or function: ``R_i = x_i * vjp(R / (y + eps))_i``."""

    def __init__(self, module: Union[nn.Module, Callable], epsilon: float = 1e-8) -> None:
        _rules.EpsilonRule.__init__(self, as_module(module), epsilon)

    def forward(self, *inputs, **kwargs):
        return lxt_stabiliser(_rules.EpsilonRule.forward(self, *inputs, **kwargs), self.epsilon)


class UniformEpsilonRule(WrapModule, _rules.UniformEpsilonRule):
    """Epsilon rule with the relevance split evenly over the inputs that receive it
    (AttnLRP Prop. 3.3): ``R_i = x_i * vjp(R / (n (y + eps)))_i``."""

    def __init__(self, module: Union[nn.Module, Callable], epsilon: float = 1e-6) -> None:
        _rules.UniformEpsilonRule.__init__(self, as_module(module), epsilon)

    def forward(self, *inputs, **kwargs):
        return lxt_stabiliser(_rules.UniformEpsilonRule.forward(self, *inputs, **kwargs), self.epsilon)


class UniformRule(WrapModule, _rules.UniformRule):
    """``R_i = R / n`` with ``n`` the number of tensor inputs, constants included (LXT)."""

    def forward(self, *inputs):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        receiving = sum(1 for t in tensors if t.requires_grad and t.is_floating_point())
        out = _rules.UniformRule.forward(self, *inputs)
        if 0 < receiving < len(tensors):  # ours splits over `receiving`: give the constants their share
            out = scale_relevance(out, lambda _: receiving / len(tensors))
        return out


class IdentityRule(WrapModule, _rules.IdentityRule):
    """The relevance passes unchanged, ``R_x = R_y`` (AttnLRP Eq. 9)."""


class StopRelevanceRule(WrapModule, _rules.StopRelevanceRule):
    """No relevance reaches the inputs (``.detach()``)."""


class _AtReference(nn.Module):
    """``module``'s values with the Jacobian of its linearisation at ``ref``: what LXT's
    Taylor rule differentiates (``y = f(x)``, ``dy/dx = J(ref)``)."""

    def __init__(self, module: nn.Module, ref) -> None:
        super().__init__()
        self.inner, self.ref = module, ref

    def forward(self, *inputs):
        refs = _references(self.ref, inputs)
        _, linear = torch.func.jvp(self.inner, tuple(refs), tuple(inputs))
        value = self.inner(*inputs)
        return value.detach() + (linear - linear.detach())


def _references(ref, inputs: Sequence[torch.Tensor]) -> list:
    if isinstance(ref, (int, float)):
        return [torch.full_like(x, float(ref)) for x in inputs]
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    if len(refs) != len(inputs):
        raise ValueError(f"TaylorDecompositionRule: ref gives {len(refs)} tensor(s) for {len(inputs)} input(s)")
    return [r.expand_as(x).to(x) for r, x in zip(refs, inputs)]


class TaylorDecompositionRule(WrapModule, _rules.TaylorDecompositionRule):
    """First-order Taylor decomposition with the Jacobian at the reference ``ref`` (a number,
    a tensor, or one tensor per input; default 0), LXT's argument order and defaults.

    ``bias=False``: ``R_i = x_i * J(ref)^T (R / (J(ref) x))`` (the bias term is left out,
    relevance is conserved). ``bias=True``: the denominator is the output ``y``;
    ``distribute_bias(inputs, relevances) -> relevances`` may then redistribute what the bias
    absorbed. Every input receives relevance (as in LXT, all inputs must be tensors).
    """

    def __init__(self, module: Union[nn.Module, Callable], ref=0, bias: bool = False,
                 distribute_bias: Optional[Callable] = None) -> None:
        _rules.TaylorDecompositionRule.__init__(self, _AtReference(as_module(module), ref), bias=bias)
        self.distribute_bias = distribute_bias

    def propagate(self, inputs, outputs, grad_outputs, vjp):
        relevances = _rules.TaylorDecompositionRule.propagate(self, inputs, outputs, grad_outputs, vjp)
        if self.bias and callable(self.distribute_bias):
            relevances = list(self.distribute_bias(tuple(inputs), tuple(relevances)))
        return relevances


def epsilon_lrp(fn: Callable, epsilon: float, *inputs):
    """``fn(*inputs)`` with the epsilon rule (LXT's function form of :class:`EpsilonRule`);
    inputs that do not require grad are constants."""
    return EpsilonRule(fn, epsilon)(*inputs)


def identity(fn: Callable, input: torch.Tensor) -> torch.Tensor:
    """``fn(input)`` with the identity rule (LXT's function form of :class:`IdentityRule`)."""
    return IdentityRule(fn)(input)


epsilon_lrp_fn = function_class(epsilon_lrp, "epsilon_lrp_fn")
identity_fn = function_class(identity, "identity_fn")
