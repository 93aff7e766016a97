r"""AttnLRP and CP-LRP for ``torch.nn.MultiheadAttention``: the rule once, for every front end
(the drop-in :class:`lrp_kernels.modules.MultiheadAttentionLRP` of the Composite, the
:class:`lrp_kernels.hooks.rules.MultiheadAttentionRule` of the Zennit-style composites, and the
patch installer :func:`lrp_kernels.hf.installers.install_multihead_attention`).

The module computes, per head ``h`` (``E`` = embed_dim, ``d = E / heads``)::

    Q = query @ Wq^T + bq     K = key @ Wk^T + bk     V = value @ Wv^T + bv
    O_h = softmax(Q_h K_h^T / sqrt(d) + mask) V_h
    out = concat_h(O_h) @ Wo^T + bo

and gets the rules of docs/math.md composed: the epsilon rule on the three in-projections (one
GEMM on the packed weight when ``query is key is value``: the epsilon rule of the stacked output
is the three rules side by side) and on the out-projection, the attention block
(:func:`lrp_kernels.ops.attention.attnlrp_attention`, exact; or, gradient view only,
:func:`lrp_kernels.ops.attention.attnlrp_platform` over ``F.scaled_dot_product_attention``).
A tensor used as query, key and value sums the relevance of the three branches.

What the module's options mean here:

* ``batch_first`` either way, and unbatched inputs (``[L, E]``);
* ``attn_mask`` ``[L, S]`` or ``[B * heads, L, S]``, bool (``True`` = *not* allowed, as torch)
  or additive float (``-inf`` = masked); ``key_padding_mask`` ``[B, S]`` bool (``True`` =
  ignore) or additive float; both combine. Masked keys get exactly zero relevance; a query row
  with every key masked outputs 0 and gets none (torch's own forward gives NaN there);
* ``is_causal``: as torch, a hint that ``attn_mask`` is the causal mask (it needs ``attn_mask``);
  where torch's SDPA path would drop the mask for the flag (no ``key_padding_mask``, no weights
  asked), the top-left causal mask is used, as SDPA does;
* ``kdim`` / ``vdim`` (separate ``q/k/v_proj_weight``) and the packed ``in_proj_weight``;
* ``add_bias_kv`` (``bias_k`` / ``bias_v``: one learned key/value appended) and
  ``add_zero_attn`` (a zero key/value appended): constants, they absorb their share;
* ``need_weights``: the attention weights are returned (averaged over heads when
  ``average_attn_weights``), computed without a graph: they are a by-product, no relevance flows
  through them;
* attention dropout is not applied (an explanation explains the deterministic model);
* a constant query or key (one that does not require grad, e.g. a learned probe as the only
  query: SigLIP's pooling head) gives the other factor of ``Q @ K^T`` all of the score relevance,
  as the uniform rule does for a product with a constant; this takes the eager composition of
  the per-op rules (N x M scores; also on the platform path). So does a query row with every
  key masked on the platform path (SDPA would give NaN there).

The out-projection is the ``out_proj`` module when a hook rule (:mod:`lrp_kernels.hooks`, or the
Zennit compatibility layer) is registered on it, so a ``LayerMapComposite`` that puts Gamma on
``nn.Linear`` reaches it; otherwise the epsilon rule. The packed in-projection is a parameter,
not a module: it always gets the epsilon rule.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import linear_epsilon as _lin
from ._common import DEFAULT_EPSILON, check_epsilon, check_float
from .attention import RULES, attnlrp_attention, attnlrp_platform

ATTENTION_PATHS = ("exact", "platform")
# classes whose forward pre-hooks are rules (lrp_kernels.hooks and the Zennit compatibility layer)
_HOOK_CLASSES = {("lrp_kernels.hooks.core", "Hook"), ("lrp_kernels.compat.zennit.core", "Hook")}


def has_hook_rule(module: nn.Module) -> bool:
    """Whether a hook rule of :mod:`lrp_kernels.hooks` (or of the Zennit compatibility layer) is
    registered on ``module``: then calling the module applies that rule."""
    for fn in module._forward_pre_hooks.values():
        owner = getattr(fn, "__self__", None)
        if owner is not None and any((c.__module__, c.__name__) in _HOOK_CLASSES for c in type(owner).__mro__):
            return True
    return False


def _projections(module: nn.MultiheadAttention):
    """``(Wq, Wk, Wv, bq, bk, bv)``: views of the module's parameters (never copies)."""
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        ws = (w[:E], w[E:2 * E], w[2 * E:])
    else:
        ws = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    b = module.in_proj_bias
    bs = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
    return ws + bs


def _additive(mask: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """torch's mask conventions (bool: True = masked; float: additive) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or a floating-point tensor, got dtype {mask.dtype}")
    return mask.detach().to(dtype)


def _merged_mask(attn_mask, key_padding_mask, B: int, H: int, L: int, S: int, extra_keys: int,
                 dtype: torch.dtype) -> Optional[torch.Tensor]:
    """One additive mask broadcastable to ``[B, H, L, S + extra_keys]`` (or None); appended keys
    (bias_k, zero attention) are allowed everywhere, as in torch."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape == (L, S):
            mask = _additive(attn_mask, "attn_mask", dtype)[None, None]
        elif attn_mask.dim() == 3 and attn_mask.shape == (B * H, L, S):
            mask = _additive(attn_mask, "attn_mask", dtype).view(B, H, L, S)
        else:
            raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)} or (batch * heads, L, S) = "
                             f"{(B * H, L, S)}, got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (batch, S) = {(B, S)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        kpm = _additive(key_padding_mask, "key_padding_mask", dtype)[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    if mask is not None and extra_keys:
        mask = F.pad(mask, (0, extra_keys))
    return mask


def _finite_bias(mask: Optional[torch.Tensor]) -> bool:
    """A mask with finite non-zero entries (an additive bias, not only 0 / -inf)."""
    if mask is None:
        return False
    finite = torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min)
    return bool((mask[finite] != 0).any())


def multihead_attention(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                        need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None,
                        average_attn_weights: bool = True, is_causal: bool = False, *,
                        rule: str = "attnlrp", epsilon: float = DEFAULT_EPSILON, relevance: bool = True,
                        attention: str = "exact", backend: Optional[str] = None,
                        out_projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """``module(query, key, value, ...)`` (an ``nn.MultiheadAttention``, same arguments and
    return value ``(output, weights or None)``) with the AttnLRP (``rule="attnlrp"``) or CP-LRP
    (``"cp-lrp"``) rule; see the module docstring.

    Args:
        relevance: True = relevance view (seed the output's relevance, ``.grad`` is relevance),
            False = gradient view (what model patches use).
        attention: ``"exact"`` (:func:`~lrp_kernels.ops.attention.attnlrp_attention`) or
            ``"platform"`` (gradient view only: ``F.scaled_dot_product_attention`` forward and
            backward with the AttnLRP rescalings, :func:`~lrp_kernels.ops.attention.attnlrp_platform`).
        out_projection: what to call for the out-projection (default: the ``out_proj`` module
            when a hook rule sits on it, else the epsilon rule).
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
    if attention == "platform" and relevance:
        raise ValueError("attention='platform' is a gradient-view path (relevance=False); "
                         "use attention='exact' in the relevance view")
    check_epsilon(epsilon)
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float(name, t)
    if (module.bias_k is None) != (module.bias_v is None):
        raise ValueError("nn.MultiheadAttention with only one of bias_k / bias_v is not a valid module")
    batched = query.dim() == 3
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    self_attention = query is key and key is value
    if not batched:  # one sequence: a batch of one, batch first
        query, key, value = query[None], key[None], value[None]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.reshape(1, -1)
    elif not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    B, L, E = query.shape
    S, H = key.shape[1], module.num_heads
    if E != module.embed_dim:
        raise ValueError(f"query has {E} features, the module's embed_dim is {module.embed_dim}")
    if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree with each other "
                         f"in batch and length, and with query {tuple(query.shape)} in batch")
    d = E // H
    if is_causal and attn_mask is None:
        raise ValueError("is_causal=True is a hint that attn_mask is the causal mask: pass attn_mask too "
                         "(as torch.nn.MultiheadAttention requires)")
    if is_causal and key_padding_mask is None and not need_weights:
        # torch's SDPA path drops the mask for the flag: the top-left causal mask
        attn_mask = ~torch.ones(L, S, dtype=torch.bool, device=query.device).tril_()

    lin = _lin.linear_epsilon
    Wq, Wk, Wv, bq, bk, bv = _projections(module)
    if self_attention and module._qkv_same_embed_dim:
        q, k, v = lin(query, module.in_proj_weight, module.in_proj_bias, epsilon, relevance=relevance,
                      backend=backend).chunk(3, dim=-1)
    else:
        q = lin(query, Wq, bq, epsilon, relevance=relevance, backend=backend)
        k = lin(key, Wk, bk, epsilon, relevance=relevance, backend=backend)
        v = lin(value, Wv, bv, epsilon, relevance=relevance, backend=backend)
    # parameters receive no relevance: a projection of an input that carries none is a constant
    # (also when the module's weights require grad)
    q, k, v = (t if x.requires_grad else t.detach() for t, x in ((q, query), (k, key), (v, value)))
    extra = 0
    if module.bias_k is not None:  # one learned key / value per sequence: constants
        k = torch.cat([k, module.bias_k.detach().to(k.dtype).expand(B, 1, E)], dim=1)
        v = torch.cat([v, module.bias_v.detach().to(v.dtype).expand(B, 1, E)], dim=1)
        extra += 1
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, 1, E)], dim=1)
        v = torch.cat([v, v.new_zeros(B, 1, E)], dim=1)
        extra += 1
    mask_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    mask = _merged_mask(attn_mask, key_padding_mask, B, H, L, S, extra, mask_dtype)

    def heads(t: torch.Tensor) -> torch.Tensor:   # [B, len, E] -> [B, H, len, d]
        return t.reshape(B, t.shape[1], H, d).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    # a constant query or key (a learned probe, SigLIP's pooling head): the uniform rule of
    # Q @ K^T gives the other factor all of the score relevance; the eager composition of the
    # per-op rules does, the fused paths and the platform path split it in two
    one_constant = q.requires_grad != k.requires_grad
    # SDPA gives NaN for a query row with every key masked; the exact paths give 0 (no relevance)
    dead_row = mask is not None and bool(torch.isneginf(mask).all(-1).any())
    if attention == "platform" and not one_constant and not dead_row:
        sdpa_mask = None if mask is None else mask.to(q.dtype)
        o = attnlrp_platform(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=sdpa_mask),
                             q, k, v, epsilon=epsilon, rule=rule, backend=backend)
    else:
        # the eager reference's relevance view puts Deep Taylor on the biased logit; the fused
        # paths follow the contract (relevance passes the additive mask unchanged)
        impl = "eager" if one_constant else "chunked" if relevance and _finite_bias(mask) else "auto"
        o = attnlrp_attention(q, k, v, mask, epsilon=epsilon, rule=rule, relevance=relevance, impl=impl,
                              backend=backend if impl == "auto" else None)
    o = o.transpose(1, 2).reshape(B, L, E)
    if out_projection is None:
        out_proj = module.out_proj
        if has_hook_rule(out_proj):
            out_projection = out_proj
        else:
            def out_projection(x):
                return lin(x, out_proj.weight, out_proj.bias, epsilon, relevance=relevance, backend=backend)
    out = out_projection(o)

    weights = None
    if need_weights:
        with torch.no_grad():
            s = (q.to(mask_dtype) @ k.to(mask_dtype).transpose(-1, -2)) / math.sqrt(d)
            if mask is not None:
                s = s + mask
            p = torch.softmax(s, dim=-1).to(q.dtype)
            weights = p.mean(dim=1) if average_attn_weights else p
    if not batched:
        out = out[0]
        weights = None if weights is None else weights[0]
    elif not module.batch_first:
        out = out.transpose(0, 1)
    return out, weights


__all__ = ["multihead_attention", "has_hook_rule"]
