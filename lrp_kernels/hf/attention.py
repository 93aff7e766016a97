"""The Hugging Face attention adapter: AttnLRP / CP-LRP through transformers' AttentionInterface.

transformers looks the attention function up by ``config._attn_implementation`` in a global
registry. We register *new* names (never overwriting a built-in one), one per rule and mask
convention, and switch only the patched model's (copied) config to them; models that are not
patched never see them.

Masks: each name is also registered in transformers' ``AttentionMaskInterface`` with the mask
builder of the model's own implementation: SDPA's (bool ``[B, 1, N, M]``, True = attend, or
``None`` when plain causality suffices, ``is_causal`` then passed on) or, for models whose own
implementation is eager, eager's additive float masks (``lrp_kernels_*_eager`` names). T5's
relative position bias (``position_bias``) is an additive constant.

Two paths (``patch(attention=...)``): ``"platform"`` runs the model's own attention function
(transformers' SDPA path, or its eager one) unchanged with the rescalings of
:func:`lrp_kernels.ops.attention.attnlrp_platform`; ``"exact"`` computes the gradients with
:func:`lrp_kernels.ops.attention.attnlrp_attention` (eager / chunked / flash-AttnLRP), the exact
rule, while the forward values still come from the model's own function (one more attention
forward). ``"auto"`` (default) is the platform path except where it cannot serve the model (a
soft-capped softmax). Either way the patched forward is the unpatched one, bit for bit.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from ..ops._common import gradient_view_owner

ATTENTION_NAMES = {"attnlrp": "lrp_kernels_attnlrp", "cp-lrp": "lrp_kernels_cplrp"}

def handle_for(module):
    """The patch handle that owns ``module`` (the options' one route: rules, epsilon, backend,
    attention); an error, never a default, for a module no active patch owns."""
    handle = gradient_view_owner(module)
    if handle is None:
        raise RuntimeError(
            f"{type(module).__name__} runs lrp_kernels' attention but belongs to no active patch "
            f"(a copy of a patched model? remove() the patch before copying, then patch the copy)")
    return handle


def _merge_bias(mask: Optional[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """One additive float mask from an additive bias (a constant: detached) and a bool/float mask."""
    bias = bias.detach().float()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, -math.inf)
    lo = torch.finfo(mask.dtype).min
    return (bias + mask.float()).masked_fill(mask <= lo, -math.inf)


class _ModelValuesFn(torch.autograd.Function):
    """Forward: ``values`` (what the unpatched model computes). Backward: the gradient goes to
    ``rule_output`` (the same quantity computed by the exact rule's implementation)."""

    @staticmethod
    def forward(ctx, rule_output, values):
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _make_adapter(rule: str, eager: bool):
    """The attention function for one rule; ``eager``: the model's own implementation was
    transformers' eager attention (masks then arrive as additive floats, as eager builds them)."""
    def lrp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, position_bias=None, is_causal=None, **kwargs):
        # dropout is ignored on purpose: attention dropout is neutralised while patched
        from ..ops.attention import attnlrp_attention, attnlrp_platform
        handle = handle_for(module)
        if handle.attention == "platform" and softcap is not None:
            raise ValueError(f"attention='platform' cannot serve the soft-capped softmax of "
                             f"{type(module).__name__} (softcap={softcap}): its identity rule on tanh is "
                             f"not the platform kernel's backward; use attention='exact' or 'auto'")

        def model_attention(q, k, v):  # exactly what the unpatched model computes
            if eager:
                fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
                if fn is not None:
                    return fn(module, q, k, v, attention_mask, dropout=0.0, scaling=scaling, softcap=softcap,
                              sliding_window=sliding_window, position_bias=position_bias, **kwargs)[0]
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=0.0, scaling=scaling,
                                          is_causal=is_causal, position_bias=position_bias, **kwargs)[0]

        if handle.attention != "exact" and softcap is None:
            out = attnlrp_platform(model_attention, query, key, value, epsilon=handle.epsilon, rule=rule,
                                   backend=handle.backend)
            return out, None
        # as transformers' SDPA path: causality from the flag only when no mask was built
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        causal = bool(causal) and attention_mask is None and query.shape[2] > 1
        mask = attention_mask
        if position_bias is not None:
            mask = _merge_bias(mask, position_bias)
        out = attnlrp_attention(
            query, key, value, mask,
            scale=scaling, is_causal=causal,
            sliding_window=sliding_window if attention_mask is None else None,  # a given mask already has the window
            softcap=softcap, epsilon=handle.epsilon, rule=rule, relevance=False, backend=handle.backend)
        out = out.transpose(1, 2).contiguous()
        with torch.no_grad():  # the forward values stay the model's own (one more attention forward)
            values = model_attention(query, key, value)
        return _ModelValuesFn.apply(out, values.to(out.dtype)), None

    lrp_attention.__name__ = f"lrp_attention_{rule.replace('-', '')}{'_eager' if eager else ''}"
    return lrp_attention


def attention_name(rule: str, model_implementation: Optional[str]) -> str:
    """Our registered name for ``rule`` on a model whose own attention implementation is
    ``model_implementation`` (eager models get eager's additive masks; all others SDPA's)."""
    return ATTENTION_NAMES[rule] + ("_eager" if model_implementation == "eager" else "")


_REGISTERED = False


def register_attention() -> None:
    """Register our names in transformers' attention (and mask) interfaces, once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    for rule in ATTENTION_NAMES:
        for eager, mask_fn in ((False, sdpa_mask), (True, eager_mask)):
            name = attention_name(rule, "eager" if eager else "sdpa")
            for interface in (AttentionInterface, AttentionMaskInterface):
                existing = interface._global_mapping.get(name)
                if existing is not None and getattr(existing, "__module__", "") not in (__name__, sdpa_mask.__module__):
                    raise RuntimeError(f"attention name {name!r} is already registered by {existing!r}")
            AttentionInterface.register(name, _make_adapter(rule, eager))
            AttentionMaskInterface.register(name, mask_fn)
    _REGISTERED = True
