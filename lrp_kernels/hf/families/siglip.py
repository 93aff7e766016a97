"""SigLIP (``SiglipModel``, its text and vision towers).

The towers are CLIP's building blocks (:mod:`.clip`) with ``gelu_pytorch_tanh`` (element-wise:
identity rule), a bidirectional text encoder that pools its *last* position (which may be
padding: SigLIP is trained with ``padding="max_length"``, so padding tokens can receive
relevance), a text ``head`` linear (epsilon) and the image-text head of :mod:`.clip` with a
constant ``logit_bias`` (a bias: it keeps its share of the logit, as an epsilon rule's bias does).

The vision tower's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``): a learned
*probe* is the only query of a ``torch.nn.MultiheadAttention`` over the patch tokens. The probe
is a constant, so the query is too: the score ``q . k`` is linear in ``k`` and the key gets the
whole score relevance (the uniform rule gives it all when the other factor is constant; a half
would go to a parameter). Softmax: Deep Taylor, ``P @ V``: uniform (AttnLRP; CP-LRP: ``P``
constant), the in- and out-projections: epsilon. The values of the module's own forward are
returned (bit for bit), the gradient is the rule's (:func:`install_probe_attention`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...ops import grad
from ...ops.attention import attnlrp_attention
from ..attention import _ModelValuesFn
from . import Family
from .clip import install_similarity_head


def _siglip_image(model, pixel_values, interpolate, kwargs):
    return model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate, **kwargs)


def _siglip_text(model, input_ids, attention_mask, position_ids, kwargs):
    return model.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x.norm(p=2, dim=-1, keepdim=True)  # SigLIP's own spelling of the norm


def install_siglip_model(handle, name, module) -> None:
    from transformers.models.siglip.modeling_siglip import SiglipOutput
    install_similarity_head(handle, module, norm=_l2, output_cls=SiglipOutput, image_features=_siglip_image,
                            text_features=_siglip_text, bias="logit_bias")


def _in_projections(module: nn.MultiheadAttention):
    """(W_q, W_k, W_v), (b_q, b_k, b_v) of a MultiheadAttention, packed or separate weights."""
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    return weights, biases


@contextlib.contextmanager
def _trainable_as_before(handle, module: nn.Module):
    """The module's parameters with ``requires_grad`` as before the patch froze them: torch's
    MultiheadAttention folds its input-projection matmul differently for a weight that requires
    grad (other bits), so its own forward values need the flags it had unpatched."""
    frozen = {id(p) for p in handle.frozen}
    thawed = [p for p in module.parameters() if id(p) in frozen and not p.requires_grad]
    for p in thawed:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(False)


def install_probe_attention(handle, name: str, module: nn.MultiheadAttention) -> None:
    """AttnLRP / CP-LRP for a ``torch.nn.MultiheadAttention`` called as SigLIP's pooling head calls
    it (``attn(query, key, value)``: no masks, no ``bias_k`` / ``bias_v``), by the eager
    composition of :func:`lrp_kernels.ops.attention.attnlrp_attention` (exact for a constant query,
    see the module docstring); the forward values are the module's own."""
    if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
        raise NotImplementedError(f"{name}: MultiheadAttention with bias_k / bias_v / add_zero_attn has no "
                                  "rule in the SigLIP family")
    heads, head_dim = module.num_heads, module.head_dim

    def split(t):  # [B, L, E] -> [B, H, L, d]
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    def make(orig):
        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if key_padding_mask is not None or attn_mask is not None or is_causal:
                raise NotImplementedError(f"{name}: the SigLIP family's MultiheadAttention rule takes no "
                                          "key_padding_mask / attn_mask / is_causal")
            with torch.no_grad(), _trainable_as_before(handle, module):  # the values: the module's own
                values, weights = orig(query, key, value, need_weights=need_weights,
                                       average_attn_weights=average_attn_weights)
            if not module.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            (wq, wk, wv), (bq, bk, bv) = _in_projections(module)
            eps, backend = handle.epsilon, handle.backend
            q = grad.linear_epsilon(query, wq, bq, eps, backend=backend)
            k = grad.linear_epsilon(key, wk, bk, eps, backend=backend)
            v = grad.linear_epsilon(value, wv, bv, eps, backend=backend)
            o = attnlrp_attention(split(q), split(k), split(v), None, scale=head_dim ** -0.5, epsilon=eps,
                                  rule=handle.rules, impl="eager")
            out = module.out_proj(o.transpose(1, 2).flatten(-2))
            if not module.batch_first:
                out = out.transpose(0, 1)
            return _ModelValuesFn.apply(out, values.to(out.dtype)), weights
        return forward
    handle.rebind(module, make)


FAMILY = Family(
    name="siglip",
    model_types=("siglip", "siglip_text_model", "siglip_vision_model"),
    module_rules={"SiglipModel": install_siglip_model, "MultiheadAttention": install_probe_attention},
    # the probe is the pooling head's constant query
    parameter_holders=("SiglipMultiheadAttentionPoolingHead",),
)
