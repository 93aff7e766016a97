"""Canonizers for torchvision's VGG and ResNet models (Zennit's ``zennit.torchvision``).

Needs torchvision (imported here, not by the rest of the compat package). The ResNet blocks add
the shortcut with ``+``, which no hook can see; the block canonizers give each block a
``canonizer_sum`` (:class:`~.layer.Sum`) and a forward that stacks shortcut and residual and sums
them with it, so composites put the Norm rule on the addition. Removing them restores the
class's forward.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock as ResNetBasicBlock, Bottleneck as ResNetBottleneck

from .canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
from .layer import Sum

__all__ = ["VGGCanonizer", "ResNetBottleneckCanonizer", "ResNetBasicBlockCanonizer", "ResNetCanonizer"]


class VGGCanonizer(SequentialMergeBatchNorm):
    """For ``torchvision.models.vgg*_bn``: merges each BatchNorm into the convolution before it."""


def _add_with_sum(block: nn.Module, shortcut: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return block.canonizer_sum(torch.stack([shortcut, residual], dim=-1))


def _basic_block_forward(self: ResNetBasicBlock, x: torch.Tensor) -> torch.Tensor:
    residual = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(_add_with_sum(self, shortcut, residual))


def _bottleneck_forward(self: ResNetBottleneck, x: torch.Tensor) -> torch.Tensor:
    residual = self.relu(self.bn1(self.conv1(x)))
    residual = self.relu(self.bn2(self.conv2(residual)))
    residual = self.bn3(self.conv3(residual))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(_add_with_sum(self, shortcut, residual))


class _BlockCanonizer(AttributeCanonizer):
    """Replace ``forward`` of every ``block_type`` with ``block_forward`` and add ``canonizer_sum``."""

    block_type: type = nn.Module
    block_forward = staticmethod(lambda self, x: x)

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> Optional[Dict[str, Any]]:
        if isinstance(module, cls.block_type):
            return {"forward": cls.block_forward.__get__(module), "canonizer_sum": Sum()}
        return None

    def copy(self) -> "_BlockCanonizer":
        return self.__class__()


class ResNetBottleneckCanonizer(_BlockCanonizer):
    """Makes the shortcut addition of ``Bottleneck`` blocks (ResNet-50 and larger) a :class:`Sum`."""
    block_type = ResNetBottleneck
    block_forward = staticmethod(_bottleneck_forward)


class ResNetBasicBlockCanonizer(_BlockCanonizer):
    """Makes the shortcut addition of ``BasicBlock`` blocks (ResNet-18/34) a :class:`Sum`."""
    block_type = ResNetBasicBlock
    block_forward = staticmethod(_basic_block_forward)


class ResNetCanonizer(CompositeCanonizer):
    """For ``torchvision.models.resnet*``: BatchNorm merging plus both block canonizers."""

    def __init__(self) -> None:
        super().__init__((SequentialMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()))
