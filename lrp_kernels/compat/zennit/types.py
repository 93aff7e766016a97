"""Groups of ``torch.nn`` module types for layer maps, as Zennit's ``zennit.types`` names them.

Each group is a class whose ``isinstance`` / ``issubclass`` test accepts every member type (and
subclasses of them), so ``(Convolution, Gamma())`` in a layer map matches ``Conv2d`` and
``ConvTranspose3d`` alike. Groups may contain groups (``Linear`` holds ``Convolution``).
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

__all__ = ["SubclassMeta", "ConvolutionTranspose", "ConvolutionStandard", "Convolution", "Linear",
           "BatchNorm", "AvgPool", "MaxPool", "Activation"]


class SubclassMeta(type):
    """Metaclass of a type group: membership is a subclass test against ``__subclass__``."""

    def __instancecheck__(cls, instance: object) -> bool:
        return cls.__subclasscheck__(type(instance))

    def __subclasscheck__(cls, sub: type) -> bool:
        members: Tuple[type, ...] = cls.__dict__.get("__subclass__", ())
        return type.__subclasscheck__(cls, sub) or issubclass(sub, members)


class ConvolutionTranspose(metaclass=SubclassMeta):
    """Transposed convolutions (``ConvTranspose1d/2d/3d``)."""
    __subclass__ = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ConvolutionStandard(metaclass=SubclassMeta):
    """Forward convolutions (``Conv1d/2d/3d``)."""
    __subclass__ = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Convolution(metaclass=SubclassMeta):
    """Every convolution, forward or transposed."""
    __subclass__ = (ConvolutionStandard, ConvolutionTranspose)


class Linear(metaclass=SubclassMeta):
    """Layers that are an affine map of their input: convolutions and ``nn.Linear``."""
    __subclass__ = (Convolution, nn.Linear)


class BatchNorm(metaclass=SubclassMeta):
    """``BatchNorm1d/2d/3d``."""
    __subclass__ = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class AvgPool(metaclass=SubclassMeta):
    """Average pooling, fixed or adaptive (a sum pooling up to a constant)."""
    __subclass__ = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class MaxPool(metaclass=SubclassMeta):
    """Max pooling, fixed or adaptive."""
    __subclass__ = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class Activation(metaclass=SubclassMeta):
    """Element-wise activations (and ``MultiheadAttention``, which Zennit files here too, so that
    its LRP composites pass relevance through it unchanged)."""
    __subclass__ = (nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU,
                    nn.LogSigmoid, nn.MultiheadAttention, nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU,
                    nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh,
                    nn.Tanhshrink, nn.Threshold)
