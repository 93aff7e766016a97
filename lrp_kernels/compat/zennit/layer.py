"""Small modules that make operations visible to hooks (Zennit's ``zennit.layer``).

A rule can only be attached to a module; :class:`Sum` turns the ``+`` of a residual connection
into one (the ResNet canonizers stack both branches and sum them with it), so a composite can give
it the :class:`~lrp_kernels.compat.zennit.rules.Norm` rule.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Sum"]


class Sum(nn.Module):
    """``input.sum(dim)`` as a module (``dim=-1`` by default)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.sum(input, dim=self.dim)
