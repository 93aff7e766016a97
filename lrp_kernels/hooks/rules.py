r"""The classic LRP rules for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` as :class:`BasicHook` s.

Notation: a layer ``z_k = sum_j x_j w_jk + b_k`` (a convolution is the same with ``w`` its
Toeplitz matrix), contributions ``z_jk = x_j w_jk``, ``p^+ = max(p, 0)``, ``p^- = min(p, 0)``,
``stab`` the stabiliser (``z + eps * sgn(z)``, ``sgn(0) = +1``). Each rule gives
``R_j = sum_k q_jk / stab(sum_j' q_j'k + bias term) * R_k`` for its own ``q`` (Bach et al. 2015,
Montavon et al. 2019):

===========  ==========================================================================
rule         ``q_jk`` (numerator) and the bias term of the denominator
===========  ==========================================================================
Epsilon      ``x_j w_jk``; ``+ b_k``
ZPlus        positive part of ``x_j w_jk`` (``x^+ w^+ + x^- w^-``); ``+ b_k^+``
AlphaBeta    ``alpha * [positive part] / (... + b^+) - beta * [negative part] / (... + b^-)``
Gamma        for ``z_k >= 0``: ``x_j w_jk + gamma (x_j w_jk)^+``, bias ``b + gamma b^+``;
             for ``z_k < 0``:  ``x_j w_jk + gamma (x_j w_jk)^-``, bias ``b + gamma b^-``
             (``gamma = 0`` is LRP-0; the case is the sign of the layer's original output
             ``z_k``, bias included, also when ``zero_params`` removes the bias from the rule)
Flat         ``1`` (over the inputs connected to ``k``); no bias
WSquare      ``w_jk^2``; ``+ b_k^2`` (zero it with ``zero_params="bias"``)
ZBox         ``x_j w_jk - l_j w_jk^+ - h_j w_jk^-`` for input bounds ``l <= x <= h``; no bias
Norm         ``x_j w_jk`` of a parameter-free module (epsilon rule, parameters untouched)
Pass         none: the output relevance is passed on unchanged (element-wise layers)
===========  ==========================================================================

``zero_params`` (a name or list, e.g. ``"bias"``) zeroes those parameters in every copy.
All rules but Flat, WSquare and ZBox also have a gradient view (``relevance=False``).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .core import BasicHook, Hook, ParamMod, identity, zero_grad_reducer
from ..ops.linear_epsilon import linear_epsilon_backward
from ..ops.linear_gamma import linear_gamma_backward
from ..ops._common import DEFAULT_EPSILON

__all__ = ["ClampMod", "GammaMod", "NoMod", "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "Flat",
           "WSquare", "ZBox", "Pass", "Norm"]

Names = Optional[Union[str, Iterable[str]]]
Stab = Union[float, Callable[[torch.Tensor], torch.Tensor]]


# ----------------------------------------------------------------------------- layer rules

def _is_normalization(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase,
             getattr(nn, "RMSNorm", ()))
    return isinstance(module, norms) or type(module).__name__.endswith(("Norm", "LayerNorm", "RMSNorm"))


class _LayerRule(BasicHook):
    """Rules defined for linear layers and convolutions (weights times inputs): a normalisation
    layer is refused (its parameters are not a linear map of the input; use ``Norm`` / ``Pass``,
    or the identity rule of the drop-ins)."""

    def _check_module(self, module: nn.Module) -> None:
        if _is_normalization(module):
            raise TypeError(f"{type(self).__name__} is a rule for linear layers and convolutions, not for the "
                            f"normalisation layer {type(module).__name__}: it would break conservation silently "
                            f"(use Pass or Norm there)")


# ----------------------------------------------------------------------------- modifiers

class NoMod(ParamMod):
    """Parameters unchanged (only ``zero_params`` are zeroed)."""

    def __init__(self, param_keys=None, zero_params: Names = None, require_params: bool = True):
        super().__init__(lambda p, _name: p, param_keys, zero_params, require_params)


class ClampMod(ParamMod):
    """``clamp(param, min, max)``: ``min=0`` keeps the positive part, ``max=0`` the negative."""

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None,
                 param_keys=None, zero_params: Names = None, require_params: bool = True):
        if min is None and max is None:
            raise ValueError("ClampMod needs min or max (or both)")
        self.min, self.max = min, max
        super().__init__(self._clamp, param_keys, zero_params, require_params)

    def _clamp(self, p: torch.Tensor, _name: str) -> torch.Tensor:
        return p.clamp(min=self.min, max=self.max)


class GammaMod(ParamMod):
    """``param + gamma * clamp(param, min, max)`` (``min=0``: favour positive weights)."""

    def __init__(self, gamma: float = 0.25, min: Optional[float] = None, max: Optional[float] = None,
                 param_keys=None, zero_params: Names = None, require_params: bool = True):
        _check_nonneg("gamma", gamma)
        self.gamma, self.min, self.max = float(gamma), min, max
        super().__init__(self._gamma, param_keys, zero_params, require_params)

    def _gamma(self, p: torch.Tensor, _name: str) -> torch.Tensor:
        return p + self.gamma * p.clamp(min=self.min, max=self.max)


def _check_nonneg(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"{name} must be a non-negative number, got {v!r}")


def _zeros(zero_params: Names, *extra: str) -> list:
    names = [] if zero_params is None else ([zero_params] if isinstance(zero_params, str) else list(zero_params))
    return names + [e for e in extra if e not in names]


def _pos(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


def _neg(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(max=0)


# ----------------------------------------------------------------------------- rules

def _fused_linear_args(rule: BasicHook, module: nn.Module, grad_input, grad_output, numeric: bool,
                       zero_params: Names, output_for_sign: bool = False):
    """(x, weight, bias, z) when a plain nn.Linear can use a fused kernel op, else None.

    ``z`` is the layer's actual output when the rule's bias differs from the layer's and the op
    needs it: in the gradient view (``R_z = G_z * z``), and for ``output_for_sign`` rules (Gamma:
    the sign of ``z`` picks the case) in both views."""
    zp = _zeros(zero_params)
    if (type(module) is not nn.Linear or not numeric or any(n != "bias" for n in zp)
            or len(grad_input) != 1 or grad_input[0] is None or len(grad_output) != 1
            or rule.stored_tensors.get("kwargs")):
        return None
    x, = rule.stored_tensors["input"]
    if x._version != rule.stored_tensors["versions"][0]:
        return None  # the generic path raises the clear error
    bias = None if (module.bias is None or "bias" in zp) else module.bias.detach()
    z = None
    if (output_for_sign or not rule.relevance) and bias is None and module.bias is not None:
        z = nn.functional.linear(x, module.weight.detach(), module.bias.detach())
    return x, module.weight.detach(), bias, z


class Epsilon(BasicHook):
    """``R_j = sum_k x_j w_jk / stab(z_k) R_k``; ``epsilon`` is a number or a stabiliser callable.

    ``nn.Linear`` with a numeric epsilon and no ``zero_params`` uses the fused
    ``linear_epsilon_backward`` kernel op (Triton on CUDA).
    """

    conserves = True

    def __init__(self, epsilon: Stab = DEFAULT_EPSILON, zero_params: Names = None, relevance: bool = True):
        if not callable(epsilon):
            _check_nonneg("epsilon", epsilon)
        self.epsilon = epsilon
        self.zero_params = zero_params
        super().__init__(param_modifiers=[NoMod(zero_params=zero_params)], stabilizer=epsilon,
                         relevance=relevance)

    def backward(self, module, grad_input, grad_output):
        fused = _fused_linear_args(self, module, grad_input, grad_output, not callable(self.epsilon),
                                   self.zero_params)
        if fused is None:
            return super().backward(module, grad_input, grad_output)
        x, weight, bias, z = fused
        if z is not None:  # the op's z is the denominator too: zeroed bias in the gradient view
            return super().backward(module, grad_input, grad_output)
        res = linear_epsilon_backward(grad_output[0], x, weight, bias, None, float(self.epsilon),
                                      self.relevance)
        self._report(module, (x,), (0,), (res,), grad_output[0])
        return (res,)


class Norm(BasicHook):
    """Epsilon rule for parameter-free modules (sum / average pooling, ...): ``R_x = x * J^T (R_y / stab(y))``."""

    conserves = True

    def __init__(self, stabilizer: Stab = DEFAULT_EPSILON, relevance: bool = True):
        super().__init__(param_modifiers=[NoMod(param_keys=[])], stabilizer=stabilizer, relevance=relevance)


class AlphaBeta(_LayerRule):
    """``R_j = sum_k [alpha q+_jk / stab(z+_k) - beta q-_jk / stab(z-_k)] R_k`` with
    ``q+ = x^+ w^+ + x^- w^-`` (positive contributions), ``z+ = sum_j q+ + b^+`` and
    ``q- = x^+ w^- + x^- w^+``, ``z- = sum_j q- + b^-``. ``alpha - beta`` must be 1 (conservation);
    anything else is refused."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stab = DEFAULT_EPSILON,
                 zero_params: Names = None, relevance: bool = True):
        _check_nonneg("alpha", alpha)
        _check_nonneg("beta", beta)
        if not math.isclose(alpha - beta, 1.0, rel_tol=0.0, abs_tol=1e-12):
            # any other pair scales the total relevance by (alpha - beta): not an LRP rule
            raise ValueError(f"AlphaBeta needs alpha - beta = 1 (conservation), got alpha={alpha!r}, beta={beta!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        z = zero_params
        super().__init__(
            input_modifiers=[_pos, _neg, _pos, _neg],
            param_modifiers=[ClampMod(min=0.0, zero_params=z), ClampMod(max=0.0, zero_params=_zeros(z, "bias")),
                             ClampMod(max=0.0, zero_params=z), ClampMod(min=0.0, zero_params=_zeros(z, "bias"))],
            gradient_mapper=self._map, stabilizer=stabilizer, relevance=relevance)

    def _map(self, grad_output, outputs):
        za, zb, zc, zd = outputs
        gp = self.alpha * grad_output / self.stabilizer(za + zb)
        gn = -self.beta * grad_output / self.stabilizer(zc + zd)
        return gp, gp, gn, gn


class ZPlus(_LayerRule):
    """``R_j = sum_k q+_jk / stab(z+_k) R_k`` (the positive half of AlphaBeta, alpha=1 beta=0)."""

    def __init__(self, stabilizer: Stab = DEFAULT_EPSILON, zero_params: Names = None, relevance: bool = True):
        z = zero_params
        super().__init__(
            input_modifiers=[_pos, _neg],
            param_modifiers=[ClampMod(min=0.0, zero_params=z), ClampMod(max=0.0, zero_params=_zeros(z, "bias"))],
            gradient_mapper=self._map, stabilizer=stabilizer, relevance=relevance)

    def _map(self, grad_output, outputs):
        g = grad_output / self.stabilizer(outputs[0] + outputs[1])
        return g, g


class Gamma(_LayerRule):
    """Gamma rule for either sign of the output: contributions of the output's sign are
    enlarged by ``gamma`` (see the table in the module docstring). Four copies:
    ``x^+ (W + gW^+) + b + gb^+``, ``x^- (W + gW^-)``, ``x^+ (W + gW^-) + b + gb^-``, ``x^- (W + gW^+)``;
    the first two add up to the positive-output denominator, the last two to the negative one.
    Which case applies is the sign of the layer's original output ``z`` (bias included): without
    ``zero_params`` the four copies add up to ``(2 + gamma) z``; with ``zero_params`` they no longer
    carry the bias, so a fifth copy (the unmodified layer) gives ``z``.

    ``nn.Linear`` with a numeric stabiliser uses the ``linear_gamma_backward`` kernel op
    (:mod:`lrp_kernels.ops.linear_gamma`; fused Triton kernels on CUDA)."""

    conserves = True

    def __init__(self, gamma: float = 0.25, stabilizer: Stab = DEFAULT_EPSILON, zero_params: Names = None,
                 relevance: bool = True):
        _check_nonneg("gamma", gamma)
        self.gamma = float(gamma)
        self.epsilon = stabilizer
        self.zero_params = zero_params
        z = zero_params
        input_modifiers = [_pos, _neg, _pos, _neg]
        param_modifiers = [GammaMod(gamma, min=0.0, zero_params=z), GammaMod(gamma, max=0.0, zero_params=_zeros(z, "bias")),
                           GammaMod(gamma, max=0.0, zero_params=z), GammaMod(gamma, min=0.0, zero_params=_zeros(z, "bias"))]
        if _zeros(z):  # the original output decides the case: one more (unmodified) copy
            input_modifiers.append(identity)
            param_modifiers.append(NoMod())
        super().__init__(input_modifiers=input_modifiers, param_modifiers=param_modifiers,
                         gradient_mapper=self._map, stabilizer=stabilizer, relevance=relevance)

    def _map(self, grad_output, outputs):
        za, zb, zc, zd = outputs[:4]
        den_p, den_n = za + zb, zc + zd
        positive = (outputs[4] if len(outputs) == 5 else den_p + den_n) >= 0
        zero = torch.zeros((), dtype=grad_output.dtype, device=grad_output.device)
        gp = torch.where(positive, grad_output / self.stabilizer(den_p), zero)
        gn = torch.where(positive, zero, grad_output / self.stabilizer(den_n))
        return (gp, gp, gn, gn) + ((torch.zeros_like(grad_output),) if len(outputs) == 5 else ())

    def backward(self, module, grad_input, grad_output):
        numeric = isinstance(self.epsilon, (int, float)) and not isinstance(self.epsilon, bool)
        fused = _fused_linear_args(self, module, grad_input, grad_output, numeric, self.zero_params,
                                   output_for_sign=True)
        if fused is None:
            return super().backward(module, grad_input, grad_output)
        x, weight, bias, z = fused
        res = linear_gamma_backward(grad_output[0], x, weight, bias, z, self.gamma, float(self.epsilon),
                                    self.relevance)
        self._report(module, (x,), (0,), (res,), grad_output[0])
        return (res,)


class Flat(_LayerRule):
    """``R_j = sum_k 1 / stab(n_k) R_k``, ``n_k`` = number of inputs connected to output ``k``."""

    supports_gradient_view = False
    conserves = ignores_bias = True

    def __init__(self, stabilizer: Stab = DEFAULT_EPSILON, zero_params: Names = None, relevance: bool = True):
        super().__init__(input_modifiers=[torch.ones_like],
                         param_modifiers=[ParamMod(lambda p, name: torch.ones_like(p),
                                                   zero_params=_zeros(zero_params, "bias"))],
                         reducer=zero_grad_reducer, stabilizer=stabilizer, relevance=relevance)


class WSquare(_LayerRule):
    """``R_j = sum_k w_jk^2 / stab(sum_j' w_j'k^2 + b_k^2) R_k``.

    Every parameter is squared, the bias too (as in Zennit and Montavon et al.'s w^2 rule written for
    layers with a bias): the ``b_k^2`` share of the relevance stays with the bias. Pass
    ``zero_params="bias"`` for the bias-free rule, which conserves relevance."""

    supports_gradient_view = False
    conserves = True

    def __init__(self, stabilizer: Stab = DEFAULT_EPSILON, zero_params: Names = None, relevance: bool = True):
        super().__init__(input_modifiers=[torch.ones_like],
                         param_modifiers=[ParamMod(lambda p, name: p * p, zero_params=zero_params)],
                         reducer=zero_grad_reducer, stabilizer=stabilizer, relevance=relevance)


class ZBox(_LayerRule):
    """z^B rule for bounded inputs ``low <= x <= high`` (e.g. the first layer on pixels):
    ``R_j = sum_k (x_j w_jk - l_j w_jk^+ - h_j w_jk^-) / stab(sum_j' ...) R_k`` (no bias).
    ``low``/``high`` are numbers or tensors broadcastable to the input."""

    supports_gradient_view = False
    conserves = ignores_bias = True

    def __init__(self, low: Union[float, torch.Tensor], high: Union[float, torch.Tensor],
                 stabilizer: Stab = DEFAULT_EPSILON, zero_params: Names = None, relevance: bool = True):
        self.low, self.high = low, high
        nb = _zeros(zero_params, "bias")
        super().__init__(
            input_modifiers=[lambda x: x, self._bound(low), self._bound(high)],
            param_modifiers=[NoMod(zero_params=nb), ClampMod(min=0.0, zero_params=nb), ClampMod(max=0.0, zero_params=nb)],
            gradient_mapper=self._map, stabilizer=stabilizer, relevance=relevance)

    @staticmethod
    def _bound(b):
        def expand(x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(b, dtype=x.dtype, device=x.device).expand_as(x).clone()
        return expand

    def _map(self, grad_output, outputs):
        z, zl, zh = outputs
        g = grad_output / self.stabilizer(z - zl - zh)
        return g, -g, -g


class Pass(Hook):
    """Pass the output relevance (or gradient) on unchanged: for element-wise layers whose
    input and output have the same shape (activations)."""

    needs_grad_input = False

    def backward(self, module, grad_input, grad_output):
        return tuple(grad_output[0] if g is not None else None for g in grad_input)
