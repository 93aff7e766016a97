"""AttnLRP / CP-LRP on ``torch.nn.MultiheadAttention`` for the Zennit-style composites.

::

    composite = LayerMapComposite([(nn.MultiheadAttention, MultiheadAttentionRule()),
                                   (nn.Linear, Gamma(0.25)), (nn.Conv2d, Gamma(0.5))])

A multi-head attention is not one linear map, so the rule is not a :class:`~lrp_kernels.hooks.core.BasicHook`:
:meth:`MultiheadAttentionRule.register` points the module instance's ``forward`` at
:func:`lrp_kernels.ops.multihead.multihead_attention` (same arguments, same outputs, the rule in
the backward) and the handle's ``remove()`` restores it; no class is modified. A rule on the
module's ``out_proj`` (Gamma on ``nn.Linear`` above) is used for the out-projection.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._common import DEFAULT_EPSILON, check_epsilon, gradient_view_owner
from ..ops.attention import RULES
from ..ops.multihead import ATTENTION_PATHS, multihead_attention
from .core import Hook, HookHandle

__all__ = ["MultiheadAttentionRule"]


class _RestoreForward:
    """Undo of one instance-forward rebinding (what the handle's ``remove()`` calls)."""

    def __init__(self, module: nn.Module, forward, previous) -> None:
        self.module, self.forward, self.previous = module, forward, previous

    def remove(self) -> None:
        if vars(self.module).get("forward") is not self.forward:
            return  # already restored
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


class MultiheadAttentionRule(Hook):
    """AttnLRP (``rule="attnlrp"``) or CP-LRP (``"cp-lrp"``) for an ``nn.MultiheadAttention``.

    Args:
        rule: ``"attnlrp"`` or ``"cp-lrp"`` (attention weights constant).
        epsilon: stabiliser of the epsilon rules (projections, products).
        relevance: True (default, as every Zennit-style rule) = relevance view; False = gradient
            view (on top of a :func:`lrp_kernels.patch`).
        attention: ``"exact"`` or, gradient view only, ``"platform"`` (see
            :func:`lrp_kernels.ops.multihead.multihead_attention`).
    """

    def __init__(self, rule: str = "attnlrp", epsilon: float = DEFAULT_EPSILON, relevance: bool = True,
                 attention: str = "exact") -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        check_epsilon(epsilon)
        if relevance is not True and relevance is not False:
            raise TypeError(f"relevance must be True (relevance view) or False (gradient view), got {relevance!r}")
        if attention not in ATTENTION_PATHS or (attention == "platform" and relevance):
            raise ValueError(f"attention must be 'exact', or 'platform' with relevance=False; got {attention!r}")
        self.rule, self.epsilon, self.relevance, self.attention = rule, epsilon, relevance, attention

    def _check_module(self, module: nn.Module) -> None:
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttentionRule is a rule for nn.MultiheadAttention, got {type(module).__name__}")

    def register(self, module: nn.Module) -> HookHandle:
        """Point ``module``'s forward at the rule; the handle's ``remove()`` restores it."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self._check_module(module)
        owner = gradient_view_owner(module)
        if owner is not None and self.relevance:
            raise ValueError(f"MultiheadAttentionRule (relevance view) on a module of a model patched in the "
                             f"gradient view ({owner!r}); use relevance=False or remove() the patch first")
        previous = vars(module).get("forward")
        if isinstance(getattr(previous, "_lrp_rule", None), MultiheadAttentionRule):
            raise RuntimeError(f"{type(module).__name__} already has a MultiheadAttentionRule; remove it first")
        rule = self

        def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                    attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                    is_causal: bool = False):
            return multihead_attention(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, rule=rule.rule, epsilon=rule.epsilon,
                                       relevance=rule.relevance, attention=rule.attention)

        forward._lrp_rule = self
        module.forward = forward
        return HookHandle(self, module, [_RestoreForward(module, forward, previous)])
