"""Attach rules (:mod:`lrp_kernels.hooks.core`) to the modules of a model, and take them off again.

A composite maps each ``(name, module)`` of ``model.named_modules()`` to a rule template or
``None``; every matched module gets its own ``rule.copy()``. ``register(model)`` /
``remove()`` or ``with composite.context(model) as model:``. Removing leaves the model exactly
as it was (no hooks left, parameters and state_dict never touched). The hooks only add
forward (pre-)hooks, so they can be combined with the model patches of
:mod:`lrp_kernels` (e.g. AttnLRP on the attention, Gamma on the linears).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Type, Union

from torch import nn

from ..ops._common import DEFAULT_EPSILON
from .core import Hook, HookHandle

__all__ = ["HookComposite", "LayerMapComposite", "NameMapComposite", "SpecialFirstLayerMapComposite"]

Types = Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]


class HookComposite:
    """Base composite: ``module_map(name, module) -> Hook template or None``."""

    def __init__(self, module_map: Optional[Callable[[str, nn.Module], Optional[Hook]]] = None):
        self.module_map = module_map
        self.handles: List[HookHandle] = []
        self.model: Optional[nn.Module] = None

    def _select(self, model: nn.Module) -> List[Tuple[nn.Module, Hook]]:
        if self.module_map is None:
            raise NotImplementedError("HookComposite needs a module_map")
        chosen = []
        for name, module in model.named_modules():
            rule = self.module_map(name, module)
            if rule is not None:
                chosen.append((module, rule))
        return chosen

    def register(self, model: nn.Module) -> "HookComposite":
        """Attach a copy of the matching rule to every matched module of ``model``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self.handles:
            raise RuntimeError(f"{type(self).__name__} is already registered; call remove() first")
        for module, rule in self._select(model):
            if not isinstance(rule, Hook):
                raise TypeError(f"rule for {type(module).__name__} must be a Hook, got {type(rule).__name__}")
            self.handles.append(rule.copy().register(module))
        self.model = model
        return self

    def remove(self) -> None:
        """Take every hook off again (idempotent)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.model = None

    @contextlib.contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        self.register(model)
        try:
            yield model
        finally:
            self.remove()

    def __len__(self) -> int:
        return len(self.handles)


def _check_types(types: Types, where: str) -> Tuple[type, ...]:
    t = types if isinstance(types, tuple) else (types,)
    if not t or not all(isinstance(x, type) and issubclass(x, nn.Module) for x in t):
        raise TypeError(f"{where}: expected an nn.Module subclass or a tuple of them, got {types!r}")
    return t


def _check_rule(rule, where: str) -> Hook:
    if not isinstance(rule, Hook):
        raise TypeError(f"{where}: expected a Hook (rule), got {type(rule).__name__}")
    return rule


class LayerMapComposite(HookComposite):
    """``[(type or tuple of types, rule), ...]``: first match by ``isinstance`` wins."""

    def __init__(self, layer_map: Sequence[Tuple[Types, Hook]]):
        self.layer_map = [(_check_types(t, f"layer_map[{i}]"), _check_rule(r, f"layer_map[{i}]"))
                          for i, (t, r) in enumerate(layer_map)]
        super().__init__(self._map)

    def _map(self, name: str, module: nn.Module) -> Optional[Hook]:
        for types, rule in self.layer_map:
            if isinstance(module, types):
                return rule
        return None


class NameMapComposite(HookComposite):
    """``[(names, rule), ...]`` with names as in ``model.named_modules()``; first match wins.
    Every name must exist in the model (a typo is an error, not a silently unexplained layer)."""

    def __init__(self, name_map: Sequence[Tuple[Union[str, Sequence[str]], Hook]]):
        self.name_map = [((n,) if isinstance(n, str) else tuple(n), _check_rule(r, f"name_map[{i}]"))
                         for i, (n, r) in enumerate(name_map)]
        super().__init__(self._map)

    def _map(self, name: str, module: nn.Module) -> Optional[Hook]:
        for names, rule in self.name_map:
            if name in names:
                return rule
        return None

    def register(self, model: nn.Module) -> "NameMapComposite":
        known = {n for n, _ in model.named_modules()}
        missing = [n for names, _ in self.name_map for n in names if n not in known]
        if missing:
            raise ValueError(f"NameMapComposite: no module named {missing} in {type(model).__name__}")
        return super().register(model)


class SpecialFirstLayerMapComposite(LayerMapComposite):
    """Like :class:`LayerMapComposite`, but the first module (in ``named_modules()`` order)
    matching a type of ``first_map`` gets that rule instead (e.g. ZBox on the input layer)."""

    def __init__(self, layer_map: Sequence[Tuple[Types, Hook]], first_map: Sequence[Tuple[Types, Hook]]):
        self.first_map = [(_check_types(t, f"first_map[{i}]"), _check_rule(r, f"first_map[{i}]"))
                          for i, (t, r) in enumerate(first_map)]
        super().__init__(layer_map)

    def _select(self, model: nn.Module) -> List[Tuple[nn.Module, Hook]]:
        first = None
        for _, module in model.named_modules():
            if any(isinstance(module, t) for t, _ in self.first_map):
                first = module
                break
        chosen = []
        for name, module in model.named_modules():
            if module is first:
                rule = next(r for t, r in self.first_map if isinstance(module, t))
            else:
                rule = self._map(name, module)
            if rule is not None:
                chosen.append((module, rule))
        return chosen


# ----------------------------------------------------------------------------- named composites

def _activations() -> Tuple[type, ...]:
    """Element-wise activations: relevance passes through them unchanged (Pass rule)."""
    return (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
            nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.PReLU)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveAvgPool3d)


def _common_map(epsilon: float) -> list:
    from .rules import Norm, Pass
    return [(_activations(), Pass()), (_POOLS, Norm(epsilon))]


class EpsilonGammaBox(SpecialFirstLayerMapComposite):
    """ZBox(low, high) on the first convolution, Gamma on the other convolutions, Epsilon on
    linear layers, Pass on activations, Norm on average pooling (a usual choice for CNNs on
    images with known pixel bounds)."""

    def __init__(self, low, high, epsilon: float = DEFAULT_EPSILON, gamma: float = 0.25):
        from .rules import Epsilon, Gamma, ZBox
        super().__init__(_common_map(epsilon) + [(_CONVS, Gamma(gamma)), (nn.Linear, Epsilon(epsilon))],
                         [(_CONVS, ZBox(low, high))])


class EpsilonPlus(LayerMapComposite):
    """ZPlus on convolutions, Epsilon on linear layers, Pass on activations, Norm on pooling."""

    def __init__(self, epsilon: float = DEFAULT_EPSILON):
        from .rules import Epsilon, ZPlus
        super().__init__(_common_map(epsilon) + [(_CONVS, ZPlus()), (nn.Linear, Epsilon(epsilon))])


class EpsilonPlusFlat(SpecialFirstLayerMapComposite):
    """As :class:`EpsilonPlus`, with the Flat rule on the first convolution or linear layer."""

    def __init__(self, epsilon: float = DEFAULT_EPSILON):
        from .rules import Epsilon, Flat, ZPlus
        super().__init__(_common_map(epsilon) + [(_CONVS, ZPlus()), (nn.Linear, Epsilon(epsilon))],
                         [(_CONVS + (nn.Linear,), Flat())])


class EpsilonAlpha2Beta1(LayerMapComposite):
    """AlphaBeta(2, 1) on convolutions, Epsilon on linear layers, Pass on activations, Norm on pooling."""

    def __init__(self, epsilon: float = DEFAULT_EPSILON):
        from .rules import AlphaBeta, Epsilon
        super().__init__(_common_map(epsilon) + [(_CONVS, AlphaBeta(2.0, 1.0)), (nn.Linear, Epsilon(epsilon))])


class EpsilonAlpha2Beta1Flat(SpecialFirstLayerMapComposite):
    """As :class:`EpsilonAlpha2Beta1`, with the Flat rule on the first convolution or linear layer."""

    def __init__(self, epsilon: float = DEFAULT_EPSILON):
        from .rules import AlphaBeta, Epsilon, Flat
        super().__init__(_common_map(epsilon) + [(_CONVS, AlphaBeta(2.0, 1.0)), (nn.Linear, Epsilon(epsilon))],
                         [(_CONVS + (nn.Linear,), Flat())])


__all__ += ["EpsilonGammaBox", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat"]
