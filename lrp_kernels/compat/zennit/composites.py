"""Zennit's composites (``zennit.composites`` of Zennit 0.5.1): rules chosen by layer type, by
module name, for the first layer, or by a list of composites — and the named composites,
registered by name in :data:`COMPOSITES`.

Every named composite takes ``layer_map`` (and ``first_map`` where it has a first layer), which
is put *before* its own map (so a user's entry wins), ``zero_params`` for its LRP rules,
``stabilizer`` for the rules other than Epsilon (whose number is ``epsilon``) and ``canonizers``.
Our :mod:`lrp_kernels.hooks.composites` has the same named composites with fewer keywords; they
are built on our own hook engine (no canonizers, no ``ctx``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from torch import nn

from .core import Composite, Hook
from .layer import Sum
from .rules import (AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ReLUBetaSmooth, ReLUDeconvNet, ReLUGuidedBackprop,
                    ZBox, ZPlus)
from .types import Activation, AvgPool, BatchNorm, Convolution, Linear

__all__ = ["LayerMapComposite", "SpecialFirstLayerMapComposite", "NameMapComposite", "MixedComposite",
           "NameLayerMapComposite", "COMPOSITES", "register_composite", "layer_map_base", "EpsilonGammaBox",
           "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat", "DeconvNet",
           "GuidedBackprop", "ExcitationBackprop", "BetaSmooth"]

LayerMap = List[Tuple[Any, Hook]]
NameMap = List[Tuple[Sequence[str], Hook]]


class LayerMapComposite(Composite):
    """``layer_map``: ``[(type or tuple of types, hook), ...]``; the first entry whose types the
    module is an instance of gives its hook."""

    def __init__(self, layer_map: LayerMap, canonizers: Optional[Sequence[Any]] = None):
        self.layer_map = layer_map
        super().__init__(module_map=self.mapping, canonizers=canonizers)

    def mapping(self, ctx: dict, name: str, module: nn.Module) -> Optional[Hook]:
        for types, hook in self.layer_map:  # the first matching entry decides
            if isinstance(module, types):
                return hook
        return None


class SpecialFirstLayerMapComposite(LayerMapComposite):
    """A :class:`LayerMapComposite` whose first module (in ``named_modules()`` order) that matches
    ``first_map`` gets that hook instead (e.g. ZBox on the layer that sees the pixels)."""

    def __init__(self, layer_map: LayerMap, first_map: LayerMap, canonizers: Optional[Sequence[Any]] = None):
        self.first_map = first_map
        super().__init__(layer_map=layer_map, canonizers=canonizers)

    def mapping(self, ctx: dict, name: str, module: nn.Module) -> Optional[Hook]:
        if not ctx.get("first_layer_visited", False):
            for types, hook in self.first_map:
                if isinstance(module, types):
                    ctx["first_layer_visited"] = True
                    return hook
        return super().mapping(ctx, name, module)


class NameMapComposite(Composite):
    """``name_map``: ``[(tuple of module names, hook), ...]`` with the names of
    ``model.named_modules()``; the first entry listing the name wins. Unknown names are ignored
    (our :class:`lrp_kernels.hooks.composites.NameMapComposite` raises on them, to catch typos)."""

    def __init__(self, name_map: NameMap, canonizers: Optional[Sequence[Any]] = None):
        self.name_map = name_map
        super().__init__(module_map=self.mapping, canonizers=canonizers)

    def mapping(self, ctx: dict, name: str, module: nn.Module) -> Optional[Hook]:
        for names, hook in self.name_map:  # the first entry naming the module decides
            if name in names:
                return hook
        return None


class MixedComposite(Composite):
    """Several composites in one: the first of ``composites`` whose map gives a hook wins. Each
    keeps its own ``ctx``; their canonizers are applied after ``canonizers``."""

    def __init__(self, composites: Sequence[Composite], canonizers: Optional[Sequence[Any]] = None):
        self.composites = composites
        own = list(canonizers) if canonizers is not None else []
        super().__init__(module_map=self.mapping,
                         canonizers=own + [c for composite in composites for c in composite.canonizers])

    def mapping(self, ctx: dict, name: str, module: nn.Module) -> Optional[Hook]:
        # every composite sees every module (its own ctx may count them), the first hook wins
        chosen = None
        for composite in self.composites:
            hook = composite.module_map(ctx.setdefault(composite, {}), name, module)
            if chosen is None:
                chosen = hook
        return chosen


class NameLayerMapComposite(MixedComposite):
    """A :class:`NameMapComposite` before a :class:`LayerMapComposite`: names first, then types."""

    def __init__(self, name_map: Optional[NameMap] = None, layer_map: Optional[LayerMap] = None,
                 canonizers: Optional[Sequence[Any]] = None):
        super().__init__(composites=[NameMapComposite(name_map=name_map or []),
                                     LayerMapComposite(layer_map=layer_map or [])], canonizers=canonizers)


#: the named composites, by name (``COMPOSITES['epsilon_plus']`` is :class:`EpsilonPlus`)
COMPOSITES: Dict[str, Type[Composite]] = {}


def register_composite(name: str) -> Callable[[Type[Composite]], Type[Composite]]:
    """Class decorator: file the composite in :data:`COMPOSITES` under ``name``."""
    def register(composite: Type[Composite]) -> Type[Composite]:
        COMPOSITES[name] = composite
        return composite
    return register


def layer_map_base(stabilizer: Any = 1e-6) -> LayerMap:
    """The entries every LRP composite starts with: Pass on activations and BatchNorm, Norm on
    :class:`~.layer.Sum` and average pooling."""
    return [(Activation, Pass()), (Sum, Norm(stabilizer=stabilizer)), (AvgPool, Norm(stabilizer=stabilizer)),
            (BatchNorm, Pass())]


def _lrp_map(layer_map: Optional[LayerMap], stabilizer: Any, convolution: Hook, epsilon: Any,
             zero_params: Any) -> LayerMap:
    return list(layer_map or []) + layer_map_base(stabilizer) + [
        (Convolution, convolution), (nn.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params))]


@register_composite("epsilon_gamma_box")
class EpsilonGammaBox(SpecialFirstLayerMapComposite):
    """ZBox(low, high) on the first convolution, Gamma on the other convolutions, Epsilon on
    ``nn.Linear``."""

    def __init__(self, low, high, epsilon=1e-6, gamma=0.25, stabilizer=1e-6, layer_map=None, first_map=None,
                 zero_params=None, canonizers=None):
        rules = {"stabilizer": stabilizer, "zero_params": zero_params}
        super().__init__(
            layer_map=_lrp_map(layer_map, stabilizer, Gamma(gamma=gamma, **rules), epsilon, zero_params),
            first_map=list(first_map or []) + [(Convolution, ZBox(low=low, high=high, **rules))],
            canonizers=canonizers)


@register_composite("epsilon_plus")
class EpsilonPlus(LayerMapComposite):
    """ZPlus on convolutions, Epsilon on ``nn.Linear``."""

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, zero_params=None, canonizers=None):
        zplus = ZPlus(stabilizer=stabilizer, zero_params=zero_params)
        super().__init__(layer_map=_lrp_map(layer_map, stabilizer, zplus, epsilon, zero_params),
                         canonizers=canonizers)


@register_composite("epsilon_alpha2_beta1")
class EpsilonAlpha2Beta1(LayerMapComposite):
    """AlphaBeta(2, 1) on convolutions, Epsilon on ``nn.Linear``."""

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, zero_params=None, canonizers=None):
        alpha_beta = AlphaBeta(alpha=2, beta=1, stabilizer=stabilizer, zero_params=zero_params)
        super().__init__(layer_map=_lrp_map(layer_map, stabilizer, alpha_beta, epsilon, zero_params),
                         canonizers=canonizers)


@register_composite("epsilon_plus_flat")
class EpsilonPlusFlat(SpecialFirstLayerMapComposite):
    """As :class:`EpsilonPlus`, with Flat on the first linear layer or convolution."""

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, first_map=None, zero_params=None,
                 canonizers=None):
        rules = {"stabilizer": stabilizer, "zero_params": zero_params}
        super().__init__(layer_map=_lrp_map(layer_map, stabilizer, ZPlus(**rules), epsilon, zero_params),
                         first_map=list(first_map or []) + [(Linear, Flat(**rules))], canonizers=canonizers)


@register_composite("epsilon_alpha2_beta1_flat")
class EpsilonAlpha2Beta1Flat(SpecialFirstLayerMapComposite):
    """As :class:`EpsilonAlpha2Beta1`, with Flat on the first linear layer or convolution."""

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, first_map=None, zero_params=None,
                 canonizers=None):
        rules = {"stabilizer": stabilizer, "zero_params": zero_params}
        super().__init__(
            layer_map=_lrp_map(layer_map, stabilizer, AlphaBeta(alpha=2, beta=1, **rules), epsilon, zero_params),
            first_map=list(first_map or []) + [(Linear, Flat(**rules))], canonizers=canonizers)


@register_composite("deconvnet")
class DeconvNet(LayerMapComposite):
    """DeconvNet (Zeiler & Fergus 2014) on every ``nn.ReLU``."""

    def __init__(self, layer_map=None, canonizers=None):
        super().__init__(list(layer_map or []) + [(nn.ReLU, ReLUDeconvNet())], canonizers=canonizers)


@register_composite("guided_backprop")
class GuidedBackprop(LayerMapComposite):
    """Guided backpropagation (Springenberg et al. 2015) on every ``nn.ReLU``."""

    def __init__(self, layer_map=None, canonizers=None):
        super().__init__(list(layer_map or []) + [(nn.ReLU, ReLUGuidedBackprop())], canonizers=canonizers)


@register_composite("excitation_backprop")
class ExcitationBackprop(LayerMapComposite):
    """Excitation backprop (Zhang et al. 2016): ZPlus on linear layers and convolutions, Norm on
    sums and average pooling."""

    def __init__(self, stabilizer=1e-6, layer_map=None, zero_params=None, canonizers=None):
        super().__init__(list(layer_map or []) + [
            (Sum, Norm(stabilizer=stabilizer)), (AvgPool, Norm(stabilizer=stabilizer)),
            (Linear, ZPlus(stabilizer=stabilizer, zero_params=zero_params))], canonizers=canonizers)


@register_composite("beta_smooth")
class BetaSmooth(LayerMapComposite):
    """ReLU gradients replaced by softplus gradients of ``beta_smooth`` (Dombrowski et al. 2019).
    ``zero_params`` is accepted (as in Zennit) and unused."""

    def __init__(self, beta_smooth=10., layer_map=None, zero_params=None, canonizers=None):
        super().__init__(list(layer_map or []) + [(nn.ReLU, ReLUBetaSmooth(beta_smooth=beta_smooth))],
                         canonizers=canonizers)

