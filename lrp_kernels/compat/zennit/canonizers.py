r"""Zennit's canonizers (``zennit.canonizers`` of Zennit 0.5.1): temporary changes that bring a
model into a form the rules are defined for, undone by ``remove()``.

A canonizer's ``apply(model)`` returns the instances it applied (one per change); a
:class:`~.core.Composite` with ``canonizers=[...]`` applies them before attaching its hooks and
reverts them in its ``remove()``.

BatchNorm merging: a BatchNorm right after a linear layer ``y = W x + b`` computes
``gamma (y - mean) / sqrt(var + eps) + beta``, again affine in ``x``; with
``s = gamma / sqrt(var + eps)`` the layer becomes ``W' = s W`` (per output channel),
``b' = s (b - mean) + beta``, and the BatchNorm is set to the identity (``mean = 0``,
``var = 1``, ``gamma = 1``, ``beta = 0``; up to its ``eps``), so the rule of the linear layer
sees the whole affine map. The parameter *objects* stay the same (only their data changes), so
references held elsewhere (optimisers, hooks) stay valid. lrp_kernels' main API has no
canonizers: its composites give BatchNorm the Pass rule, which is what Zennit's LRP composites
do with a merged (identity) BatchNorm too.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core import collect_leaves
from .types import BatchNorm, ConvolutionTranspose, Linear

__all__ = ["Canonizer", "MergeBatchNorm", "SequentialMergeBatchNorm", "NamedMergeBatchNorm", "AttributeCanonizer",
           "CompositeCanonizer"]


class Canonizer(metaclass=ABCMeta):
    """Base class: ``apply`` finds where the canonizer applies and registers a copy there;
    ``register`` makes one change, ``remove`` undoes it."""

    @abstractmethod
    def apply(self, root_module: nn.Module) -> List["Canonizer"]:
        """The instances applied below ``root_module`` (subclasses extend this list)."""
        return []

    @abstractmethod
    def register(self, *args: Any) -> None:
        """Make the change."""

    @abstractmethod
    def remove(self) -> None:
        """Undo the change."""

    def copy(self) -> "Canonizer":
        """A new, unregistered instance (without constructor arguments)."""
        return self.__class__()


class MergeBatchNorm(Canonizer):
    """Merge a BatchNorm into the linear layer(s) before it (module docstring); which pairs are
    merged is up to the subclass' ``apply``."""

    linear_type = (Linear,)
    batch_norm_type = (BatchNorm,)

    def __init__(self) -> None:
        super().__init__()
        self.linears: Optional[Sequence[nn.Module]] = None
        self.batch_norm: Optional[nn.Module] = None
        self.linear_params: Optional[List[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None
        self.batch_norm_params: Optional[Dict[str, torch.Tensor]] = None

    def register(self, linears: Sequence[nn.Module], batch_norm: nn.Module) -> None:
        """Remember the current parameters of ``linears`` and ``batch_norm``, then merge."""
        self.linears, self.batch_norm = list(linears), batch_norm
        self.linear_params = [(m.weight.data, None if m.bias is None else m.bias.data) for m in self.linears]
        self.batch_norm_params = {key: getattr(batch_norm, key).data
                                  for key in ("weight", "bias", "running_mean", "running_var")
                                  if getattr(batch_norm, key, None) is not None}
        self.merge_batch_norm(self.linears, batch_norm)

    def remove(self) -> None:
        """Put the remembered parameters back (a bias the merge had to add is removed again)."""
        for module, (weight, bias) in zip(self.linears or [], self.linear_params or []):
            module.weight.data = weight
            if bias is None:
                module.bias = None
            else:
                module.bias.data = bias
        for key, value in (self.batch_norm_params or {}).items():
            getattr(self.batch_norm, key).data = value

    @staticmethod
    def merge_batch_norm(modules: Sequence[nn.Module], batch_norm: nn.Module) -> None:
        """Fold ``batch_norm`` (in eval form: running statistics) into each of ``modules`` and set it
        to the identity."""
        with torch.no_grad():
            mean, var = batch_norm.running_mean, batch_norm.running_var
            gamma = batch_norm.weight if batch_norm.weight is not None else torch.ones_like(mean)
            beta = batch_norm.bias if batch_norm.bias is not None else torch.zeros_like(mean)
            scale = gamma / (var + batch_norm.eps).sqrt()
            shift = beta - mean * scale
            for module in modules:
                weight = module.weight.data
                # output channels: dim 1 of a transposed convolution's weight, dim 0 otherwise
                channel = 1 if isinstance(module, ConvolutionTranspose) else 0
                view = [1] * weight.ndim
                view[channel] = -1
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros_like(scale, dtype=weight.dtype, device=weight.device),
                                               requires_grad=module.weight.requires_grad)
                module.weight.data = weight * scale.reshape(view).to(weight)
                module.bias.data = (module.bias.data * scale + shift).to(weight)
            batch_norm.running_mean.data = torch.zeros_like(mean)
            batch_norm.running_var.data = torch.ones_like(var)
            if batch_norm.weight is not None:
                batch_norm.weight.data = torch.ones_like(batch_norm.weight)
            if batch_norm.bias is not None:
                batch_norm.bias.data = torch.zeros_like(batch_norm.bias)


class SequentialMergeBatchNorm(MergeBatchNorm):
    """Merge every BatchNorm that directly follows a linear layer among the model's leaves, in
    registration order (so children must be registered in the order the forward uses them, and
    an activation between the two must be a module to be seen)."""

    def apply(self, root_module: nn.Module) -> List[Canonizer]:
        instances = super().apply(root_module)
        previous = None
        for leaf in collect_leaves(root_module):
            if isinstance(previous, self.linear_type) and isinstance(leaf, self.batch_norm_type):
                instance = self.copy()
                instance.register((previous,), leaf)
                instances.append(instance)
            previous = leaf
        return instances


class NamedMergeBatchNorm(MergeBatchNorm):
    """Merge BatchNorms named in ``name_map``: ``[(linear names, batch norm name), ...]``."""

    def __init__(self, name_map: Sequence[Tuple[Sequence[str], str]]):
        super().__init__()
        self.name_map = name_map

    def apply(self, root_module: nn.Module) -> List[Canonizer]:
        instances = super().apply(root_module)
        modules = dict(root_module.named_modules())
        for linear_names, batch_norm_name in self.name_map:
            instance = self.copy()
            instance.register([modules[name] for name in linear_names], modules[batch_norm_name])
            instances.append(instance)
        return instances

    def copy(self) -> "NamedMergeBatchNorm":
        return self.__class__(self.name_map)


class AttributeCanonizer(Canonizer):
    """Set attributes on module instances, e.g. a new ``forward``; ``remove`` deletes them again
    (so an instance attribute that existed before is gone afterwards, and a replaced method
    falls back to the class's).

    ``attribute_map(name, module) -> dict or None`` gives the attributes for each module.
    """

    def __init__(self, attribute_map: Callable[[str, nn.Module], Optional[Dict[str, Any]]]):
        self.attribute_map = attribute_map
        self.attribute_keys: Optional[List[str]] = None
        self.module: Optional[nn.Module] = None

    def apply(self, root_module: nn.Module) -> List[Canonizer]:
        instances = super().apply(root_module)
        for name, module in root_module.named_modules():
            attributes = self.attribute_map(name, module)
            if attributes is not None:
                instance = self.copy()
                instance.register(module, attributes)
                instances.append(instance)
        return instances

    def register(self, module: nn.Module, attributes: Dict[str, Any]) -> None:
        self.module, self.attribute_keys = module, list(attributes)
        for key, value in attributes.items():
            setattr(module, key, value)

    def remove(self) -> None:
        for key in self.attribute_keys or []:
            delattr(self.module, key)

    def copy(self) -> "AttributeCanonizer":
        return AttributeCanonizer(self.attribute_map)


class CompositeCanonizer(Canonizer):
    """Several canonizers applied as one (``apply`` returns all their instances)."""

    def __init__(self, canonizers: Sequence[Canonizer]):
        self.canonizers = canonizers

    def apply(self, root_module: nn.Module) -> List[Canonizer]:
        instances = super().apply(root_module)
        for canonizer in self.canonizers:
            instances += canonizer.apply(root_module)
        return instances

    def register(self) -> None:
        """Nothing: the instances of the parts are registered by their ``apply``."""

    def remove(self) -> None:
        """Nothing: the instances of the parts are removed one by one."""
