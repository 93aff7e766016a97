"""The Hugging Face attention adapter: AttnLRP / CP-LRP through transformers' AttentionInterface.

transformers looks the attention function up by ``config._attn_implementation`` in a global
registry. We register two *new* names (never overwriting a built-in one) and switch only the
patched model's (copied) config to them; models that are not patched never see them.

Masks: the names are also registered in transformers' ``AttentionMaskInterface`` with the SDPA
mask builder, so masks arrive as bool ``[B, 1, N, M]`` (True = attend) or ``None`` when plain
causality suffices (then ``is_causal`` is passed on, as transformers' SDPA path does).
T5's relative position bias (``position_bias``) is an additive constant folded into the mask.

Two paths (``patch(attention=...)``): ``"platform"`` runs transformers' own SDPA attention
(forward values bit for bit those of an unpatched SDPA model; FlashAttention / memory-efficient
/ cuDNN kernels on CUDA) with the rescalings of
:func:`lrp_kernels.ops.attention.attnlrp_platform`; ``"exact"`` runs
:func:`lrp_kernels.ops.attention.attnlrp_attention` (eager / chunked / flash-AttnLRP), the
exact rule. ``"auto"`` (default) is the platform path except where it cannot serve the model
(a soft-capped softmax).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

ATTENTION_NAMES = {"attnlrp": "lrp_kernels_attnlrp", "cp-lrp": "lrp_kernels_cplrp"}

# patched module -> its PatchHandle (the options' one route: rules, epsilon, backend)
_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def bind(module, handle) -> None:
    """The adapter reads ``handle``'s options when transformers calls it for ``module``."""
    _HANDLES[module] = handle


def unbind(module) -> None:
    _HANDLES.pop(module, None)


def handle_for(module):
    """The patch handle of ``module``; an error (never a default) for a module no patch bound."""
    handle = _HANDLES.get(module)
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


def _make_adapter(rule: str):
    def lrp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, position_bias=None, is_causal=None, **kwargs):
        # dropout is ignored on purpose: attention dropout is neutralised while patched
        from ..ops.attention import attnlrp_attention, attnlrp_platform
        handle = handle_for(module)
        if handle.attention == "platform" and softcap is not None:
            raise ValueError(f"attention='platform' cannot serve the soft-capped softmax of "
                             f"{type(module).__name__} (softcap={softcap}): its identity rule on tanh is "
                             f"not the platform kernel's backward; use attention='exact' or 'auto'")
        if handle.attention != "exact" and softcap is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            def platform(q, k, v):  # exactly what transformers' SDPA path computes
                return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=0.0, scaling=scaling,
                                              is_causal=is_causal, position_bias=position_bias, **kwargs)[0]
            out = attnlrp_platform(platform, query, key, value, epsilon=handle.epsilon, rule=rule,
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
        return out.transpose(1, 2).contiguous(), None

    lrp_attention.__name__ = f"lrp_attention_{rule.replace('-', '')}"
    return lrp_attention


_REGISTERED = False


def register_attention() -> None:
    """Register our names in transformers' attention (and mask) interfaces, once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    for rule, name in ATTENTION_NAMES.items():
        for interface in (AttentionInterface, AttentionMaskInterface):
            existing = interface._global_mapping.get(name)
            if existing is not None and getattr(existing, "__module__", "") not in (__name__, sdpa_mask.__module__):
                raise RuntimeError(f"attention name {name!r} is already registered by {existing!r}")
        AttentionInterface.register(name, _make_adapter(rule))
        AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTERED = True
