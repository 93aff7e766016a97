"""LXT's special functions (``lxt.explicit.special``): CP-LRP multi-head attention.

:func:`multi_head_attention_cp` is ``nn.MultiheadAttention``'s forward with the attention
weights as constants: queries and keys carry no relevance; the value product
``A @ V`` is our matmul rule with a constant operand (all relevance to ``V``, the epsilon
rule with LXT's stabiliser); the value and
output projections are whatever modules are passed (a ``Composite`` puts rules on them).
Our main API's CP-LRP for Hugging Face models is ``lrp_kernels.patch(model, rules="cp-lrp")``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ....ops import functional as _lf
from .._conventions import lxt_stabiliser

__all__ = ["multi_head_attention_cp"]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = masked, as nn.MultiheadAttention) as ``-inf`` / 0; a float one as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@torch.no_grad()
def _prepare_attn_mask(mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``attn_mask`` (``[L, S]`` or ``[B * heads, L, S]``) as an additive mask broadcastable to
    the scores ``[B, heads, L, S]``; ``query`` is ``[B, heads, L, d]``."""
    if mask.dim() == 3:
        mask = mask.view(query.shape[0], query.shape[1], *mask.shape[-2:])
    return _additive(mask, query.dtype)


@torch.no_grad()
def _prepare_key_padding_mask(mask: torch.Tensor, attn_mask: Optional[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` ``[B, S]`` as an additive mask ``[B, 1, 1, S]``."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    return _additive(mask, query.dtype)


def multi_head_attention_cp(query, key, value, batch_first: bool, num_heads: int, head_dim: int,
                            q_proj_weight: torch.Tensor, bias_q: Optional[torch.Tensor], k_proj_weight: torch.Tensor,
                            bias_k: Optional[torch.Tensor], v_proj: Callable, out_proj: Callable,
                            key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                            attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True):
    """Multi-head attention with CP-LRP; returns ``(output, weights or None)`` as
    ``nn.MultiheadAttention`` (weights averaged over heads when ``average_attn_weights``)."""
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, n, embed = query.shape
    m = value.shape[1]

    def heads(t: torch.Tensor, length: int) -> torch.Tensor:
        return t.reshape(b, length, num_heads, head_dim).transpose(1, 2)   # [B, heads, len, d]

    with torch.no_grad():  # the attention weights are constants for relevance
        q = heads(torch.nn.functional.linear(query, q_proj_weight, bias_q), n)
        k = heads(torch.nn.functional.linear(key, k_proj_weight, bias_k), m)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if key_padding_mask is not None:
            scores = scores + _prepare_key_padding_mask(key_padding_mask, attn_mask, q)
        if attn_mask is not None:
            scores = scores + _prepare_attn_mask(attn_mask, q)
        weights = torch.softmax(scores, dim=-1)
    v = heads(v_proj(value), m)
    # one operand constant: V gets all the relevance (LXT: the epsilon rule on the product)
    out = lxt_stabiliser(_lf.matmul(weights, v, epsilon=1e-6), 1e-6)
    out = out_proj(out.transpose(1, 2).reshape(b, n, embed))
    if not batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (weights.mean(dim=1) if average_attn_weights else weights)
