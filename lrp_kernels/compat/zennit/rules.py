r"""Zennit's rules (``zennit.rules`` of Zennit 0.5.1) as :class:`~.core.BasicHook` configurations.

Each LRP rule is data: ``K`` input modifiers, parameter modifiers (:class:`ClampMod`,
:class:`GammaMod`, :class:`NoMod`), a gradient mapper and a reducer (see the table in
:mod:`lrp_kernels.hooks.rules` for the formulas). ``zero_params`` (a name or a list) zeroes those
parameters in every copy. Epsilon and Gamma on ``nn.Linear`` compute their backward with our
kernel ops (:mod:`lrp_kernels.ops.linear_epsilon`, :mod:`lrp_kernels.ops.linear_gamma`; fused
Triton kernels on CUDA) whenever those give Zennit's numbers; every other case runs the generic
path.

Where this follows Zennit and our :mod:`lrp_kernels.hooks.rules` differs:

* ``AlphaBeta`` accepts only ``alpha - beta = 1`` (conservative) and ``alpha, beta >= 0``.
* ``Gamma`` takes the positive or negative case from the layer's *original* output, bias
  included, also with ``zero_params='bias'``; an output of exactly 0 gets no relevance (ours
  counts it as positive).
* ``WSquare`` denominators include ``b^2`` unless ``zero_params`` zeroes the bias.
* ``ZBox`` never uses the bias (``b - b^+ - b^-`` cancels); ``Flat`` zeroes it always.
* Every rule runs in the relevance view only (ours also have a gradient view, ``relevance=False``).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from ...ops.linear_epsilon import linear_epsilon_backward
from ...ops.linear_gamma import linear_gamma_backward
from .core import BasicHook, Hook, Names, ParamMod, _name_list, expand
from .core import Stabilizer  # noqa: F401  (zennit.rules exposes it too)

__all__ = ["zero_bias", "ClampMod", "GammaMod", "NoMod", "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "ZBox", "Pass",
           "Norm", "WSquare", "Flat", "ReLUDeconvNet", "ReLUGuidedBackprop", "ReLUBetaSmooth"]

Stab = Union[float, Callable[[torch.Tensor], torch.Tensor]]


def zero_bias(zero_params: Names = None) -> List[str]:
    """``zero_params`` as a list, with ``'bias'`` added if it is not there."""
    names = _name_list(zero_params)
    return names if "bias" in names else names + ["bias"]


class ClampMod(ParamMod):
    """Parameters clamped to ``[min, max]`` (``min=0``: positive part, ``max=0``: negative part)."""

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None, **kwargs):
        super().__init__(lambda param, name: param.clamp(min=min, max=max), **kwargs)


class GammaMod(ParamMod):
    """``param + gamma * clamp(param, min, max)``: the clamped part enlarged by ``gamma``."""

    def __init__(self, gamma: float = 0.25, min: Optional[float] = None, max: Optional[float] = None, **kwargs):
        super().__init__(lambda param, name: param + gamma * param.clamp(min=min, max=max), **kwargs)


class NoMod(ParamMod):
    """Parameters unchanged (``zero_params``, ``param_keys`` and ``require_params`` still apply)."""

    def __init__(self, **kwargs):
        super().__init__(lambda param, name: param, **kwargs)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


def _negative(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(max=0)


def _first_gradient(inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reducer of rules whose modified input is a constant (Flat, WSquare)."""
    return gradients[0]


# ----------------------------------------------------------------------------- our kernels

def _plain_linear(hook: BasicHook, module: nn.Module, zero_params: Names):
    """``(x, weight, bias)`` when ``module`` is a plain ``nn.Linear`` our ops cover, else None."""
    zeroed = _name_list(zero_params)
    inputs = hook.stored_tensors.get("input", ())
    if type(module) is not nn.Linear or len(inputs) != 1 or any(n != "bias" for n in zeroed):
        return None
    bias = None if module.bias is None or "bias" in zeroed else module.bias.detach()
    return inputs[0].detach(), module.weight.detach(), bias


def _linear_epsilon(hook: BasicHook, module: nn.Module, grad_output: torch.Tensor, *, zero_params: Names):
    epsilon = getattr(hook.stabilizer, "plain_epsilon", None)
    operands = _plain_linear(hook, module, zero_params)
    if epsilon is None or operands is None:
        return None
    return linear_epsilon_backward(grad_output, *operands, None, epsilon, True).to(grad_output.dtype)


def _linear_gamma(hook: BasicHook, module: nn.Module, grad_output: torch.Tensor, *, gamma: float,
                  zero_params: Names):
    epsilon = getattr(hook.stabilizer, "plain_epsilon", None)
    operands = _plain_linear(hook, module, zero_params)
    if epsilon is None or operands is None:
        return None
    z = None
    if operands[2] is None and module.bias is not None:
        # the rule zeroes the bias; the case still follows the layer's output, bias included
        z = nn.functional.linear(operands[0], operands[1], module.bias.detach())
    return linear_gamma_backward(grad_output, *operands, z, gamma, epsilon, True).to(grad_output.dtype)


# ----------------------------------------------------------------------------- LRP rules

class Epsilon(BasicHook):
    """LRP-epsilon (Bach et al. 2015): ``R_x = x * J^T (R_y / stab(y))``; ``epsilon=0`` is LRP-0.

    ``epsilon`` is a number or a stabiliser callable (the other rules call it ``stabilizer``).
    """

    def __init__(self, epsilon: Stab = 1e-6, zero_params: Names = None):
        super().__init__(input_modifiers=[_same], param_modifiers=[NoMod(zero_params=zero_params)],
                         output_modifiers=[_same], stabilizer=epsilon,
                         fused=functools.partial(_linear_epsilon, zero_params=zero_params))


class Gamma(BasicHook):
    """Generalised LRP-gamma (Montavon et al. 2019; Andéol et al. 2021) for either output sign:
    contributions of the output's sign are enlarged by ``gamma``; the sign is the layer's original
    output's (a fifth, unmodified copy), bias included."""

    def __init__(self, gamma: float = 0.25, stabilizer: Stab = 1e-6, zero_params: Names = None):
        keep, nobias = {"zero_params": zero_params}, {"zero_params": zero_bias(zero_params)}
        super().__init__(
            input_modifiers=[_positive, _negative, _positive, _negative, _same],
            param_modifiers=[GammaMod(gamma, min=0., **keep), GammaMod(gamma, max=0., **nobias),
                             GammaMod(gamma, max=0., **keep), GammaMod(gamma, min=0., **nobias), NoMod()],
            output_modifiers=[_same] * 5,
            gradient_mapper=self._map, reducer=self._reduce, stabilizer=stabilizer,
            fused=functools.partial(_linear_gamma, gamma=gamma, zero_params=zero_params))

    def _map(self, out_grad: torch.Tensor, outputs: Sequence[torch.Tensor]) -> list:
        upper = out_grad * (outputs[4] > 0) / self.stabilizer(outputs[0] + outputs[1])
        lower = out_grad * (outputs[4] < 0) / self.stabilizer(outputs[2] + outputs[3])
        return [upper, upper, lower, lower, torch.zeros_like(out_grad)]

    @staticmethod
    def _reduce(inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(x * g for x, g in zip(inputs[:4], gradients[:4]))


class ZPlus(BasicHook):
    """LRP-z+ (alpha=1, beta=0), negative inputs allowed: only positive contributions
    ``x^+ w^+ + x^- w^-`` (and ``b^+``) count."""

    def __init__(self, stabilizer: Stab = 1e-6, zero_params: Names = None):
        super().__init__(
            input_modifiers=[_positive, _negative],
            param_modifiers=[ClampMod(min=0., zero_params=zero_params),
                             ClampMod(max=0., zero_params=zero_bias(zero_params))],
            output_modifiers=[_same] * 2,
            gradient_mapper=self._map, stabilizer=stabilizer)

    def _map(self, out_grad: torch.Tensor, outputs: Sequence[torch.Tensor]) -> list:
        return [out_grad / self.stabilizer(outputs[0] + outputs[1])] * 2


class AlphaBeta(BasicHook):
    """LRP-alpha-beta (Bach et al. 2015): ``alpha`` times the positive-contribution share minus
    ``beta`` times the negative one. ``alpha, beta >= 0`` and ``alpha - beta = 1`` (else
    ``ValueError``), so relevance is conserved."""

    def __init__(self, alpha: float = 2., beta: float = 1., stabilizer: Stab = 1e-6, zero_params: Names = None):
        if alpha < 0 or beta < 0:
            raise ValueError(f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={alpha!r}, beta={beta!r}")
        if alpha - beta != 1:
            raise ValueError(f"AlphaBeta needs alpha - beta = 1 (conservation), got alpha={alpha!r}, beta={beta!r}")
        self.alpha, self.beta = alpha, beta
        keep, nobias = {"zero_params": zero_params}, {"zero_params": zero_bias(zero_params)}
        super().__init__(
            input_modifiers=[_positive, _negative, _positive, _negative],
            param_modifiers=[ClampMod(min=0., **keep), ClampMod(max=0., **nobias),
                             ClampMod(max=0., **keep), ClampMod(min=0., **nobias)],
            output_modifiers=[_same] * 4,
            gradient_mapper=self._map, reducer=self._reduce, stabilizer=stabilizer)

    def _map(self, out_grad: torch.Tensor, outputs: Sequence[torch.Tensor]) -> list:
        upper = out_grad / self.stabilizer(outputs[0] + outputs[1])
        lower = out_grad / self.stabilizer(outputs[2] + outputs[3])
        return [upper, upper, lower, lower]

    def _reduce(self, inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
        positive = inputs[0] * gradients[0] + inputs[1] * gradients[1]
        negative = inputs[2] * gradients[2] + inputs[3] * gradients[3]
        return self.alpha * positive - self.beta * negative


class ZBox(BasicHook):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by ``low <= x <= high`` (numbers or
    tensors, broadcast as :func:`~.core.expand` does; e.g. ``(1, 3, 1, 1)`` per channel)."""

    def __init__(self, low: Union[float, torch.Tensor], high: Union[float, torch.Tensor], stabilizer: Stab = 1e-6,
                 zero_params: Names = None):
        def bound(value):
            return lambda x: expand(value, x.shape, cut_batch_dim=True).to(x)

        keep = {"zero_params": zero_params}
        super().__init__(
            input_modifiers=[_same, bound(low), bound(high)],
            param_modifiers=[NoMod(**keep), ClampMod(min=0., **keep), ClampMod(max=0., **keep)],
            output_modifiers=[_same] * 3,
            gradient_mapper=self._map, reducer=self._reduce, stabilizer=stabilizer)

    def _map(self, out_grad: torch.Tensor, outputs: Sequence[torch.Tensor]) -> list:
        return [out_grad / self.stabilizer(outputs[0] - outputs[1] - outputs[2])] * 3

    @staticmethod
    def _reduce(inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
        return inputs[0] * gradients[0] - inputs[1] * gradients[1] - inputs[2] * gradients[2]


class Norm(BasicHook):
    """The epsilon rule with the parameters untouched (and not required): for sum and average
    pooling and other parameter-free linear maps."""

    def __init__(self, stabilizer: Stab = 1e-6):
        super().__init__(input_modifiers=[_same], param_modifiers=[NoMod(param_keys=[])],
                         output_modifiers=[_same], stabilizer=stabilizer)


class WSquare(BasicHook):
    """LRP-w² (Montavon et al. 2017): ``R_x = sum_k w^2 / stab(sum w^2 + b^2) R_k`` — with ``b^2``
    unless ``zero_params`` zeroes the bias (our main-API rule documents its own choice)."""

    def __init__(self, stabilizer: Stab = 1e-6, zero_params: Names = None):
        super().__init__(
            input_modifiers=[torch.ones_like],
            param_modifiers=[ParamMod(lambda param, name: param ** 2, zero_params=zero_params)],
            output_modifiers=[_same], reducer=_first_gradient, stabilizer=stabilizer)


class Flat(BasicHook):
    """LRP-flat (Lapuschkin et al. 2019): WSquare with every weight 1 and no bias — relevance is
    spread evenly over the inputs each output is connected to."""

    def __init__(self, stabilizer: Stab = 1e-6, zero_params: Names = None):
        super().__init__(
            input_modifiers=[torch.ones_like],
            param_modifiers=[ParamMod(lambda param, name: torch.ones_like(param),
                                      zero_params=zero_bias(zero_params), require_params=False)],
            output_modifiers=[_same], reducer=_first_gradient, stabilizer=stabilizer)


# ----------------------------------------------------------------------------- gradient rules

class Pass(Hook):
    """Pass the output relevance on unchanged (element-wise layers, e.g. activations)."""

    def backward(self, module, grad_input, grad_output):
        return grad_output


class ReLUDeconvNet(Hook):
    """DeconvNet (Zeiler & Fergus 2014): a ReLU passes the positive part of its output gradient."""

    def backward(self, module, grad_input, grad_output):
        return (grad_output[0].clamp(min=0),)


class ReLUGuidedBackprop(Hook):
    """Guided backpropagation (Springenberg et al. 2015): the ReLU's gradient where the output
    gradient is positive, zero elsewhere."""

    def backward(self, module, grad_input, grad_output):
        return (grad_input[0] * (grad_output[0] > 0.),)


class ReLUBetaSmooth(Hook):
    """The ReLU's gradient replaced by softplus's, ``sigmoid(beta_smooth * x)`` (Dombrowski et al.
    2019): smooth surrogate gradients, e.g. for second-order gradients."""

    def __init__(self, beta_smooth: float = 10.):
        super().__init__()
        self.beta_smooth = beta_smooth

    def copy(self) -> "ReLUBetaSmooth":
        return self.__class__(beta_smooth=self.beta_smooth)

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input

    def backward(self, module, grad_input, grad_output):
        return (torch.sigmoid(self.beta_smooth * self.stored_tensors["input"][0]) * grad_output[0],)
